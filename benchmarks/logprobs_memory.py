"""Peak extra memory of sequence log-probs: chunked logsumexp+gather against naive log_softmax.

Each measurement runs in a fresh subprocess. The peak resident set (VmHWM) is reset through
/proc/self/clear_refs after the inputs exist, so the figure is the memory the log-prob
computation itself adds. Run: ``python -m benchmarks.logprobs_memory [--batch 8 --length 256]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from benchmarks._memory import reset_peak, status_kib

VOCAB = 49152  # SmolLM2's vocabulary
HIDDEN = 576  # and width


def measure(
    method: str, batch: int, length: int, backward: bool, vocab: int = VOCAB, hidden: int = HIDDEN
) -> dict:
    import torch

    from gsil.logprobs import naive_sequence_logps, sequence_logps, sequence_logps_from_hidden

    torch.manual_seed(0)
    labels = torch.randint(0, vocab, (batch, length))
    labels[:, : length // 4] = -100  # a prompt
    if method in ("naive", "chunked"):
        inputs = (torch.randn(batch, length, vocab).requires_grad_(backward),)
        function = {"naive": naive_sequence_logps, "chunked": sequence_logps}[method]
    else:  # from final hidden states through the output layer
        inputs = (
            torch.randn(batch, length, hidden).requires_grad_(backward),
            (torch.randn(vocab, hidden) / hidden**0.5).requires_grad_(backward),
        )

        def naive_projected(hidden, weight, labels):
            return naive_sequence_logps(hidden @ weight.T, labels)

        function = {"naive-projected": naive_projected, "from-hidden": sequence_logps_from_hidden}[
            method
        ]
    function(*(x[:1, :8] if x.dim() == 3 else x for x in inputs), labels[:1, :8])  # warm up
    before = reset_peak()
    start = time.perf_counter()
    with torch.set_grad_enabled(backward):
        logps = function(*inputs, labels)
        if backward:
            logps.sum().backward()
    seconds = time.perf_counter() - start
    peak_extra_mib = (status_kib("VmHWM") - before) / 1024
    return {
        "method": method,
        "backward": backward,
        "peak_extra_mib": round(peak_extra_mib, 1),
        "seconds": round(seconds, 3),
        "logps": logps.detach()[:2].tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        method, backward = args.child
        print(json.dumps(measure(method, args.batch, args.length, backward == "1")))
        return
    rows = []
    for backward in ("0", "1"):
        for method in ("naive", "chunked", "naive-projected", "from-hidden"):
            command = [
                sys.executable,
                "-m",
                "benchmarks.logprobs_memory",
                "--batch",
                str(args.batch),
                "--length",
                str(args.length),
                "--child",
                method,
                backward,
            ]
            rows.append(json.loads(subprocess.check_output(command, text=True).strip()))
    print(f"sequence log-probs, batch {args.batch} x length {args.length} x vocab {VOCAB}, fp32")
    print("(naive/chunked start from logits; naive-projected/from-hidden from hidden states)")
    print(f"{'pass':<18}{'method':<17}{'peak extra MiB':>16}{'seconds':>10}")
    for row in rows:
        kind = "forward+backward" if row["backward"] else "forward"
        print(f"{kind:<18}{row['method']:<17}{row['peak_extra_mib']:>16}{row['seconds']:>10}")
    by_key = {(r["method"], r["backward"]): r for r in rows}
    for backward in (False, True):
        for ours, naive in (("chunked", "naive"), ("from-hidden", "naive-projected")):
            a, b = by_key[(ours, backward)], by_key[(naive, backward)]
            agree = max(abs(x - y) for x, y in zip(a["logps"], b["logps"], strict=True))
            print(
                f"{'forward+backward' if backward else 'forward'}: {ours}/{naive} peak = "
                f"{a['peak_extra_mib'] / b['peak_extra_mib']:.3f}, "
                f"time = {a['seconds'] / b['seconds']:.2f}x, "
                f"max |difference| of log-probs = {agree:.2e}"
            )


if __name__ == "__main__":
    main()
