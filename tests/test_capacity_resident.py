"""`--mu auto`'s estimate must hold after it is made (issue 21): what a daemon process holds
once the probe is done and set-up goes on (the model fingerprint) stays within the part the
estimate counts as held besides training. Before the fix, the probe's freed memory stayed
resident (glibc keeps freed memory in a daemon) and the fingerprint built the full model, ~400
MB for kjv-large that stayed resident beside training: 4 daemons under a 1536 MiB limit were
killed in round 1."""

from __future__ import annotations

import json
import subprocess
import sys

from peerd.models import TransformerConfig, TransformerSpec
from peerd.models.base import full_shapes_module

MiB = 2**20

# What a daemon does up to its first round, in a fresh process as `peerd start` runs it: glibc
# told to keep freed memory, the parameters, the probe of every width, the fingerprint. The
# model is one wide block (35M parameters, 139 MB): large enough that what the probe freed
# (~150 MB) and a full model built again exceed the estimate's runtime margin (128 MiB).
DAEMON_SET_UP = """
import json
import torch
from peerd.algorithm.submodel import init_params
from peerd.allocator import keep_freed_memory
from peerd.capacity import measure_capacity, resident_bytes
from peerd.config import TrainConfig
from peerd.data import Split
from peerd.models import TransformerConfig, TransformerSpec
from peerd.models.base import fingerprint

torch.set_num_threads(1)
keep_freed_memory()
spec = TransformerSpec(TransformerConfig(vocab_size=16, block_size=8, n_layer=1, n_head=8,
                                         head_dim=64, d_model=512, d_ffn=32768))
params = init_params(spec, 0)
tokens = torch.randint(0, 16, (16, 9), generator=torch.Generator().manual_seed(0))
choice = measure_capacity(spec, params, Split(tokens[:, :-1], tokens[:, 1:], None),
                          TrainConfig(batch_size=4, lr=0.01), None, None)
fingerprint(spec)
print(json.dumps({"resident": resident_bytes(), "fixed": choice.fixed_bytes}))
"""


def test_what_a_daemon_holds_after_the_probe_stays_within_the_estimate() -> None:
    result = subprocess.run([sys.executable, "-c", DAEMON_SET_UP], capture_output=True,
                            text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    # Measured: 563 MiB resident against a fixed part of 486 MiB before the fix, 447 against
    # 485 after.
    assert figures["resident"] <= figures["fixed"], (
        f"resident {figures['resident'] / MiB:.0f} MiB after the probe and the fingerprint, "
        f"the estimate's fixed part {figures['fixed'] / MiB:.0f} MiB")


def test_the_fingerprint_module_holds_no_values() -> None:
    spec = TransformerSpec(TransformerConfig(vocab_size=16, block_size=8, n_layer=1, n_head=2,
                                             head_dim=8, d_model=16, d_ffn=32))
    module = full_shapes_module(spec)
    assert all(p.is_meta for p in module.parameters())
    assert sum(p.numel() for p in module.parameters()) > 0
