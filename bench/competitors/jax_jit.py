"""JAX: the whole step under jax.jit, parameters and optimizer state donated; SGD with
momentum and Adam written out with PyTorch's formulas."""
import importlib
import itertools

LIBRARIES = {"jax": lambda: importlib.import_module("jax")}


def params_of(p):
    import jax.numpy as jnp
    return [(jnp.array(W, copy=True), jnp.array(b, copy=True))
            for W, b in zip(p.weights, p.biases)]


def forward(params, X):
    import jax
    a = X
    for i, (W, b) in enumerate(params):
        a = a @ W.T + b
        if i < len(params) - 1:
            a = jax.nn.relu(a)
    return a


def train_step(p, opt):
    import jax
    import jax.numpy as jnp
    import numpy as np

    def loss_fn(params, X, y):
        logp = jax.nn.log_softmax(forward(params, X))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    params = params_of(p)
    if opt == "sgd":
        state = jax.tree.map(jnp.zeros_like, params)

        def update(params, buf, grads, lr=0.01, momentum=0.9):  # torch.optim.SGD
            buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
            params = jax.tree.map(lambda w, b: w - lr * b, params, buf)
            return params, buf
    else:
        state = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params),
                 jnp.zeros((), jnp.float32))

        def update(params, state, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):  # torch Adam
            m, v, t = state
            t = t + 1
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
            step_size = lr / (1 - b1 ** t)
            bias2_sqrt = jnp.sqrt(1 - b2 ** t)
            params = jax.tree.map(
                lambda w, m, v: w - step_size * m / (jnp.sqrt(v) / bias2_sqrt + eps),
                params, m, v)
            return params, (m, v, t)

    def train_step(params, state, X, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, y)
        params, state = update(params, state, grads)
        return params, state, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    batches = itertools.cycle([(jnp.asarray(X), jnp.asarray(y.astype(np.int32)))
                               for X, y in p.batches])
    box = [params, state]

    def step():
        X, y = next(batches)
        box[0], box[1], loss = jitted(box[0], box[1], X, y)
        return loss.block_until_ready()
    return step, 1


def predict(p, n):
    import jax
    import jax.numpy as jnp
    params = params_of(p)
    X = jnp.asarray(p.X[:n])
    jitted = jax.jit(forward)
    return lambda: jitted(params, X).block_until_ready()


def gemm_functions(a, b, out):
    import jax
    ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
    mm = jax.jit(lambda x, y: x @ y)
    return {"jax": lambda: mm(ja, jb).block_until_ready()}


TRAIN = {"jax": train_step}
PREDICT = {"jax": predict}
