"""The float64 answer every provider's loss and gradient is compared with.

``unisd_fast.unisd_loss(impl="reference")`` on float64 copies of the benchmark inputs. It
materialises several float64 tokens x vocab tensors, so it is only run where it fits (half
the free memory of the device, else of the host); otherwise errors are not reported for
that case.
"""

from __future__ import annotations

import os

import torch

from .inputs import DTYPES, Case, config_for, detached_copy, needs

# float64 bytes per tokens x vocab element: inputs, their copies and the temporaries of
# log_softmax, exp and the products in the reference (measured ~2n + 6 with n logit tensors).
_TEMPS = 8


def estimate_bytes(case: Case) -> int:
    use_views, use_negative, _ = needs(config_for(case.preset))
    n = 2 + (case.views if use_views else 0) + (1 if use_negative else 0)
    elem = case.tokens * case.vocab
    return elem * (8 * (2 * n + _TEMPS) + DTYPES[case.dtype].itemsize)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def placement(case: Case, device: torch.device) -> torch.device | None:
    """Where the float64 reference of ``case`` fits (device first, then host), or None."""
    need = estimate_bytes(case)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if need < free // 2:
            return device
    if need < _host_available() // 2:
        return torch.device("cpu")
    return None


def reference_result(inputs: dict, cfg, where: torch.device) -> dict:
    """{"loss": float, "grad": float64 CPU tensor of d loss / d student_logits}."""
    import unisd_fast

    x = detached_copy(inputs, torch.float64, device=where)
    out = unisd_fast.unisd_loss(**x, config=cfg, impl="reference")
    out.loss.backward()
    grad = x["student_logits"].grad.to("cpu")
    loss = float(out.loss.detach())
    del x, out
    return {"loss": loss, "grad": grad}
