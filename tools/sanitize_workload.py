"""A short run through every compiled path of bpfast, for tools/sanitize.sh.

Run under AddressSanitizer or valgrind memcheck, any invalid read or write in the
compiled core shows up as a report with its stack. Exits 0 when every step ran.
Usage: python tools/sanitize_workload.py [--quick]
"""
import sys
import threading

import numpy as np

import bpfast as bp
from bpfast import _compiled

QUICK = "--quick" in sys.argv
rng = np.random.default_rng(0)


def nets(dtype):
    for hidden in [a for a in bp.ACTIVATIONS if a != "softmax"]:
        for output in (None, "softmax", "sigmoid", "tanh"):
            kwargs = ({"negative_slope": 0.2} if hidden == "leaky_relu" else
                      {"alpha": 1.3} if hidden == "elu" else {})
            yield bp.Network([bp.Dense(5, 7, hidden, **kwargs), bp.Dense(7, 3, hidden, bias=False,
                                                                          **kwargs),
                              bp.Dense(3, 4, output)], dtype=dtype, seed=1)


def losses(output):
    out = [(bp.MSE(), "real"), (bp.MSE(half=True), "real"), (bp.L1(), "real"),
           (bp.Huber(0.5), "real")]
    if output == "softmax":
        out += [(bp.CrossEntropy(from_logits=False), "labels")]
    elif output == "sigmoid":
        out += [(bp.BinaryCrossEntropy(from_logits=False), "binary")]
    else:
        out += [(bp.CrossEntropy(), "labels"), (bp.CrossEntropy(), "binary"),
                (bp.BinaryCrossEntropy(), "binary")]
    return out


def target(kind, n):
    if kind == "labels":
        return rng.integers(0, 4, n)
    if kind == "binary":
        return rng.uniform(size=(n, 4))
    return rng.standard_normal((n, 4))


OPTIMIZERS = [lambda: bp.SGD(lr=0.01, momentum=0.9, nesterov=True, weight_decay=0.01),
              lambda: bp.SGD(lr=0.01, momentum=0.5, dampening=0.2), lambda: bp.SGD(lr=0.01),
              lambda: bp.Adam(lr=0.01, amsgrad=True), lambda: bp.AdamW(lr=0.01),
              lambda: bp.RMSprop(lr=0.01, momentum=0.5, centered=True),
              lambda: bp.Adagrad(lr=0.01, lr_decay=0.01, initial_accumulator_value=0.1)]

steps = 0
for dtype in ("float32", "float64"):
    for i, net in enumerate(nets(dtype)):
        output = net.layers[-1].activation
        for j, (loss, kind) in enumerate(losses(output)):
            if QUICK and (i + j) % 3:
                continue
            opt = OPTIMIZERS[(i + j) % len(OPTIMIZERS)]()
            for n in (1, 9, 4, 33):  # grow the workspaces, then smaller batches in them
                X, y = rng.standard_normal((n, 5)), target(kind, n)
                net.train_step(X, y, loss, opt)
                net.compute_gradients(X, y, loss)
                out = net.forward(X)
                loss(out, y)
                net.backward(loss.gradient(out, y))
                opt.step(net)
                steps += 1
            X, y = rng.standard_normal((37, 5)), target(kind, 37)
            for batch_size in (None, 1, 8, 100):
                net.fit(X, y, loss=loss, optimizer=opt, epochs=2, batch_size=batch_size,
                        shuffle=batch_size != 8)
            net.predict(rng.standard_normal((3, 5)))

# predict over many chunks, and a last partial chunk
wide = bp.Network([bp.Dense(16, 256, "relu"), bp.Dense(256, 16)], seed=0)
wide.predict(rng.standard_normal((4096 * 3 + 17, 16)).astype(np.float32))

# inputs that take the conversion paths: Fortran, strided, unaligned, int, big-endian
net = bp.Network([bp.Dense(5, 6, "tanh"), bp.Dense(6, 3)], dtype="float64", seed=0)
X = rng.standard_normal((12, 5))
buffer = bytearray(X.nbytes + 1)
unaligned = np.frombuffer(buffer, dtype=np.float64, offset=1, count=X.size).reshape(X.shape)
unaligned[...] = X
labels = rng.integers(0, 3, 12)
for odd in (np.asfortranarray(X), np.repeat(X, 2, axis=1)[:, ::2], unaligned,
            (X * 10).astype(np.int16), X.astype(">f8")):
    net.train_step(odd, labels, bp.CrossEntropy(), bp.SGD(lr=0.1))
    net.predict(odd)

# bad input: each must raise cleanly
opt = bp.Adam()
net.train_step(X, labels, bp.CrossEntropy(), opt)
bad = X.copy()
bad[3, 2] = np.nan
for call in (lambda: net.train_step(bad, labels, bp.CrossEntropy(), opt),
             lambda: net.train_step(X, labels + 3, bp.CrossEntropy(), opt),
             lambda: net.train_step(X[:, :4], labels, bp.CrossEntropy(), opt),
             lambda: net.backward(np.ones((12, 3))),
             lambda: net.fit(X, labels[:-1], loss=bp.CrossEntropy(), optimizer=opt)):
    try:
        call()
    except (ValueError, TypeError):
        pass
    else:
        raise AssertionError("bad input accepted")
net.forward(X)
for shape in ((12, 4), (11, 3), (36,)):
    try:
        net.backward(np.ones(shape))
    except ValueError:
        pass

# threads: two networks at once, and one network from two threads (RuntimeError allowed)
def train(network, n):
    o = bp.Adam(lr=1e-3)
    for _ in range(n):
        network.train_step(X, labels, bp.CrossEntropy(), o)


pair = [bp.Network([bp.Dense(5, 64, "gelu"), bp.Dense(64, 3)], seed=s) for s in (1, 2)]
threads = [threading.Thread(target=train, args=(p, 50)) for p in pair]
[t.start() for t in threads]
[t.join() for t in threads]

shared = bp.Network([bp.Dense(5, 8, "tanh"), bp.Dense(8, 3)], dtype="float64", seed=3)
g_small = rng.standard_normal((4, 3))


def forward_backward():
    for _ in range(200 if not QUICK else 50):
        try:
            shared.forward(X[:4])
            shared.backward(g_small)
        except (RuntimeError, ValueError):
            pass


def forward_bigger():
    for i in range(200 if not QUICK else 50):
        try:
            shared.forward(X[: 5 + i % 8])
        except RuntimeError:
            pass


# the same interleaving made deterministic: another thread's forward() (more rows)
# lands while backward() is still converting its grad_output in Python
import bpfast.network as network_module  # noqa: E402

if hasattr(network_module, "as_float_array"):
    original = network_module.as_float_array

    def convert_then_forward(name, value, *args, **kwargs):
        result = original(name, value, *args, **kwargs)
        if name == "grad_output":
            network_module.as_float_array = original
            shared.forward(X[:12])
        return result

    network_module.as_float_array = convert_then_forward
    shared.forward(X[:4])
    try:
        shared.backward(g_small)
    except (RuntimeError, ValueError):
        pass
    network_module.as_float_array = original

sys.setswitchinterval(1e-6)
threads = [threading.Thread(target=forward_backward), threading.Thread(target=forward_bigger)]
[t.start() for t in threads]
[t.join() for t in threads]
print(f"sanitize workload: {steps} step groups with {_compiled.core.__name__}, done")
