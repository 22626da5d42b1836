"""The algorithm: plans (DSS and baselines), sub-models, aggregation, losses, one peer's round
as pure steps (engine) and the round driver both the simulator and the daemon run."""
