"""What a loss (or activation) written in NumPy costs per step, against the built-in one.

    python bench/custom_loss.py [--quick] [--threads 1] [--shapes S,M] [--rounds 3]

bench/run.py's problems (common.Problem: S and M, float32, its initial weights),
train_step per batch (cycling through the batches) and fit per batch (one epoch of
shuffled batches, the compiled epoch loop), each with:

* mse: the built-in MSE against ``bp.CustomLoss`` of the same math in NumPy,
  ``(out - y) ** 2`` and ``2 * (out - y)``, on one-hot targets;
* cross_entropy: the built-in cross-entropy from logits (class labels) against
  log-softmax written in NumPy (one loss per sample) on one-hot targets;
* relu: the built-in ReLU hidden layer (MSE loss) against ``bp.CustomActivation`` of
  ``np.maximum(z, 0)`` and ``(z > 0)``;
* callback_only: the built-in MSE against a custom loss whose functions return
  arrays made beforehand (no arithmetic): the cost of the callback mechanism alone
  (taking the GIL, the views, the checks, the reduction and the copy).

Both sides of a pair run in this one process, interleaved round by round, and are
timed by common.measure. Reported: microseconds per step (the median over rounds of
each round's median), the extra cost of the Python callback per step, and the
ratio custom / built-in. The parameters after a few steps are compared too: the
custom side trains the same network (to float32 rounding).
"""
import argparse
import itertools
import statistics
import sys

import common


def losses(bp, np):
    """(name, built-in loss, custom loss, custom targets one-hot?) pairs."""
    def mse_value(out, y):
        return (out - y) ** 2

    def mse_gradient(out, y):
        return 2 * (out - y)

    def ce_value(out, y):
        shifted = out - out.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        return -(y * log_p).sum(axis=1)

    def ce_gradient(out, y):
        shifted = out - out.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        p /= p.sum(axis=1, keepdims=True)
        return p - y

    return [("mse", bp.MSE(), bp.CustomLoss(mse_value, mse_gradient)),
            ("cross_entropy", bp.CrossEntropy(), bp.CustomLoss(ce_value, ce_gradient))]


def network(bp, problem, activation="relu"):
    w = problem.widths
    layers = [bp.Dense(i, o, activation=activation) for i, o in zip(w[:-2], w[1:-1])]
    layers.append(bp.Dense(w[-2], w[-1]))
    net = bp.Network(layers, dtype="float32", seed=0)
    for layer, W, b in zip(net.layers, problem.weights, problem.biases):
        layer.weight[...] = W
        layer.bias[...] = b
    return net


def cases(bp, np, problem):
    """{case: {"builtin": (step, per_call), "custom": (step, per_call)}} and a check."""
    one_hot = np.eye(problem.widths[-1], dtype=np.float32)
    dense_batches = [(X, one_hot[y]) for X, y in problem.batches]
    dense_y = one_hot[problem.y]
    relu = bp.CustomActivation(lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype),
                         name="numpy_relu")
    pairs = {}
    for name, builtin, custom in losses(bp, np):
        builtin_targets = problem.batches if name == "cross_entropy" else dense_batches
        builtin_y = problem.y if name == "cross_entropy" else dense_y
        pairs[f"{name}/train_step"] = {
            "builtin": _steps(bp, network(bp, problem), builtin, builtin_targets),
            "custom": _steps(bp, network(bp, problem), custom, dense_batches)}
        pairs[f"{name}/fit"] = {
            "builtin": _fit(bp, network(bp, problem), builtin, problem, builtin_y),
            "custom": _fit(bp, network(bp, problem), custom, problem, dense_y)}
    zeros = {}

    def cached(out, y):  # the same zero array every call: no NumPy work at all
        return zeros.setdefault(out.shape, np.zeros(out.shape, out.dtype))

    nothing = bp.CustomLoss(cached, cached, check_gradient=False, name="cached")
    pairs["callback_only/train_step"] = {
        "builtin": _steps(bp, network(bp, problem), bp.MSE(), dense_batches),
        "custom": _steps(bp, network(bp, problem), nothing, dense_batches)}
    pairs["relu/train_step"] = {
        "builtin": _steps(bp, network(bp, problem), bp.MSE(), dense_batches),
        "custom": _steps(bp, network(bp, problem, relu), bp.MSE(), dense_batches)}
    return pairs


def _steps(bp, net, loss, batches):
    optimizer = bp.SGD(lr=0.01, momentum=0.9)
    cycle = itertools.cycle(batches)

    def step():
        X, y = next(cycle)
        return net.train_step(X, y, loss, optimizer)
    return step, 1, net


def _fit(bp, net, loss, problem, y):
    optimizer = bp.SGD(lr=0.01, momentum=0.9)

    def epoch():
        return net.fit(problem.X, y, loss=loss, optimizer=optimizer, epochs=1,
                       batch_size=problem.batch, shuffle=True)
    return epoch, problem.n_batches, net


def agreement(bp, np, problem):
    """Max |difference| of the parameters after 5 train_steps, custom vs built-in."""
    one_hot = np.eye(problem.widths[-1], dtype=np.float32)
    result = {}
    for name, builtin, custom in losses(bp, np):
        a, b = network(bp, problem), network(bp, problem)
        for X, y in problem.batches[:5]:
            a.train_step(X, y if name == "cross_entropy" else one_hot[y], builtin, "sgd")
            b.train_step(X, one_hot[y], custom, "sgd")
        result[name] = float(np.abs(a.parameters - b.parameters).max())
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run, to check it works")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="S,M")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    common.configure_threads(args.threads)
    bp = common.import_bpfast()
    import numpy as np
    timing = common.timing(args.quick)
    rounds = 1 if args.quick else args.rounds
    print(f"bpfast {bp.__version__} from {bp.__file__}; {args.threads} thread(s), "
          f"{rounds} round(s); microseconds per step (median)", flush=True)
    print(f"{'shape':5} {'case':24} {'built-in':>10} {'custom':>10} {'extra':>9} "
          f"{'ratio':>7}")
    for shape in [s for s in args.shapes.split(",") if s in common.SHAPES]:
        problem = common.Problem(shape, common.n_batches(shape, args.quick))
        pairs = cases(bp, np, problem)
        for case, sides in pairs.items():
            medians = {"builtin": [], "custom": []}
            for _ in range(rounds):
                for side in ("builtin", "custom"):
                    step, per_call, _ = sides[side]
                    samples = common.measure(step, timing, per_call)
                    medians[side].append(statistics.median(samples) / per_call * 1e6)
            builtin = statistics.median(medians["builtin"])
            custom = statistics.median(medians["custom"])
            print(f"{shape:5} {case:24} {builtin:10.2f} {custom:10.2f} "
                  f"{custom - builtin:9.2f} {custom / builtin:7.2f}", flush=True)
        differences = agreement(bp, np, problem)
        print(f"{shape:5} parameters after 5 steps, max |custom - built-in|: "
              + ", ".join(f"{name} {value:.1e}" for name, value in differences.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
