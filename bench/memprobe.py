"""Peak memory of a short training run, measured in a fresh process (run by bench/run.py).

    python bench/memprobe.py IMPL OPTIMIZER THREADS STEPS WIDTHS BATCH
    e.g. python bench/memprobe.py bpfast adam 2 50 784,512,512,10 128

IMPL is bpfast or torch. Prints one JSON line: the resident set size after the imports
and the data ("baseline"), its high-water mark over the run ("peak"), and their
difference in MiB: what the framework needs to hold the model, the optimizer state and
its workspaces, plus any allocator churn.

On Linux the high-water mark is VmHWM from /proc/self/status, reset to the current RSS
after the imports (clear_refs), so that a peak reached while importing does not hide
the run's. getrusage's ru_maxrss would not do: Linux carries it over from the parent
through exec, so a child of a big parent reports the parent's peak. Elsewhere
ru_maxrss is used as is.
"""
import json
import os
import resource
import sys


def status_kib(field):
    """A field of /proc/self/status in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def baseline_mib():
    """Current RSS, with the high-water mark reset to it where Linux allows."""
    rss = status_kib("VmRSS")
    if rss is not None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            return rss / 1024.0
        except OSError:
            pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def peak_mib():
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def main():
    impl, opt_name, threads, steps, widths, batch = sys.argv[1:7]
    threads, steps, batch = int(threads), int(steps), int(batch)
    widths = [int(w) for w in widths.split(",")]

    import numpy as np

    rng = np.random.default_rng(0)
    X = rng.standard_normal((batch, widths[0])).astype(np.float32)
    y = rng.integers(0, widths[-1], batch).astype(np.int64)

    if impl == "bpfast":
        import common  # bench/common.py: finds bpfast as run.py's workers do
        bp = common.import_bpfast()
        if hasattr(bp, "set_num_threads"):
            bp.set_num_threads(threads)
        baseline = baseline_mib()
        layers = [bp.Dense(i, o, activation="relu") for i, o in zip(widths[:-2], widths[1:-1])]
        layers.append(bp.Dense(widths[-2], widths[-1]))
        net = bp.Network(layers, dtype="float32", seed=0)
        loss = bp.CrossEntropy()
        opt = bp.SGD(lr=0.01, momentum=0.9) if opt_name == "sgd" else bp.Adam(lr=1e-3)
        for _ in range(steps):
            net.train_step(X, y, loss, opt)
    elif impl == "torch":
        import torch
        torch.set_num_threads(threads)
        baseline = baseline_mib()
        Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
        mods = []
        for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
            mods.append(torch.nn.Linear(n_in, n_out))
            if i < len(widths) - 2:
                mods.append(torch.nn.ReLU())
        model = torch.nn.Sequential(*mods)
        loss_fn = torch.nn.CrossEntropyLoss()
        if opt_name == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        else:
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(Xt), yt).backward()
            opt.step()
    else:
        raise SystemExit(f"unknown impl {impl!r}")

    peak = peak_mib()
    print(json.dumps({"impl": impl, "optimizer": opt_name, "baseline_mib": round(baseline, 2),
                      "peak_mib": round(peak, 2), "delta_mib": round(peak - baseline, 2),
                      "pid": os.getpid()}))


if __name__ == "__main__":
    main()
