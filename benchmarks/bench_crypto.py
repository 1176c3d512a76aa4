"""Crypto path cost: DEK wrap/unwrap through `KeyHandle.seal/open` against raw `AESGCM`
(baseline measured in the same run, interleaved), and local L1 provider wrap/unwrap.

    .venv/bin/python -m benchmarks.bench_crypto
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from benchmarks.common import report
from plugins.crypto import KeyHandle, new_dek
from plugins.l1 import l2_aad
from plugins.l1_local import LocalL1

N = 20_000
N_L1 = 5_000
REPEATS = 7
AAD = b"openkcm/dek/v1\0acme\0e1v7"


def _interleaved(fns: dict[str, Callable[[], int]]) -> dict[str, dict[str, float]]:
    """Run each function REPEATS times, alternating between them so drift hits all alike;
    median, min and max operations per second."""
    rates: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(REPEATS):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {
        name: {
            "median_per_s": round(statistics.median(r)),
            "min_per_s": round(min(r)),
            "max_per_s": round(max(r)),
            "repeats": REPEATS,
        }
        for name, r in rates.items()
    }


def main() -> None:
    raw_key = os.urandom(32)  # the baseline's own key; the handle gets another one
    gcm = AESGCM(raw_key)
    handle = KeyHandle.generate()
    deks = [new_dek() for _ in range(N)]
    raw_blobs = [(n := os.urandom(12)) + gcm.encrypt(n, d, AAD) for d in deks]
    handle_blobs = [handle.seal(d, AAD) for d in deks]

    def raw_wrap() -> int:
        for d in deks:
            nonce = os.urandom(12)
            _ = nonce + gcm.encrypt(nonce, d, AAD)
        return N

    def handle_wrap() -> int:
        for d in deks:
            handle.seal(d, AAD)
        return N

    def raw_unwrap() -> int:
        for b in raw_blobs:
            gcm.decrypt(b[:12], b[12:], AAD)
        return N

    def handle_unwrap() -> int:
        for b in handle_blobs:
            handle.open(b, AAD)
        return N

    dek = _interleaved(
        {
            "raw_aesgcm_wrap": raw_wrap,
            "keyhandle_seal": handle_wrap,
            "raw_aesgcm_unwrap": raw_unwrap,
            "keyhandle_open": handle_unwrap,
        }
    )

    with tempfile.TemporaryDirectory() as tmp:
        l1 = LocalL1.open(str(Path(tmp) / "keyring.json"), "eu-central-1")
        l2s = [KeyHandle.generate() for _ in range(N_L1)]
        aads = [l2_aad(f"t{i}", "default", "e1v1") for i in range(N_L1)]
        blobs = [l1.wrap("default", k, a) for k, a in zip(l2s, aads, strict=True)]

        def l1_wrap() -> int:
            for k, a in zip(l2s, aads, strict=True):
                l1.wrap("default", k, a)
            return N_L1

        def l1_unwrap() -> int:
            for b, a in zip(blobs, aads, strict=True):
                l1.unwrap("default", b, a)
            return N_L1

        local = _interleaved({"local_l1_wrap": l1_wrap, "local_l1_unwrap": l1_unwrap})
        l1.close()

    results: dict[str, Any] = {
        "dek_ops_per_run": N,
        **dek,
        "ratio_seal_vs_raw": round(
            dek["keyhandle_seal"]["median_per_s"] / dek["raw_aesgcm_wrap"]["median_per_s"], 3
        ),
        "ratio_open_vs_raw": round(
            dek["keyhandle_open"]["median_per_s"] / dek["raw_aesgcm_unwrap"]["median_per_s"], 3
        ),
        "l1_ops_per_run": N_L1,
        **local,
    }
    report("crypto", results)


if __name__ == "__main__":
    main()
