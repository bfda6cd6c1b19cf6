"""A plain NumPy multilayer perceptron: the benchmark's "what NumPy alone does" baseline.

ReLU hidden layers, identity output, cross-entropy on logits with integer labels (mean
over the batch), and PyTorch's SGD-with-momentum and Adam update rules. Written to be
simple and obviously right, with the easy in-place operations a careful NumPy user would
write, nothing more. Weights are (out, in) as in PyTorch: z = a @ W.T + b.
"""
import numpy as np


def init_params(widths, seed=0, dtype=np.float32):
    """PyTorch's default Linear init: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias."""
    rng = np.random.default_rng(seed)
    weights, biases = [], []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        bound = 1.0 / np.sqrt(n_in)
        weights.append(rng.uniform(-bound, bound, (n_out, n_in)).astype(dtype))
        biases.append(rng.uniform(-bound, bound, n_out).astype(dtype))
    return weights, biases


class NumpyMLP:
    def __init__(self, weights, biases, optimizer="sgd", lr=0.01, momentum=0.9,
                 betas=(0.9, 0.999), eps=1e-8):
        self.params = [p.copy() for pair in zip(weights, biases) for p in pair]  # W0, b0, W1, ...
        self.optimizer = optimizer
        self.lr, self.momentum, self.betas, self.eps = lr, momentum, betas, eps
        self.state1 = [np.zeros_like(p) for p in self.params]  # momentum buffer / Adam m
        self.state2 = [np.zeros_like(p) for p in self.params]  # Adam v
        self.t = 0

    def forward(self, X):
        a = X
        n_layers = len(self.params) // 2
        for i in range(n_layers):
            W, b = self.params[2 * i], self.params[2 * i + 1]
            a = a @ W.T
            a += b
            if i < n_layers - 1:
                np.maximum(a, 0, out=a)
        return a

    def gradients(self, X, y):
        """Forward, loss, backward. Returns (loss, list of gradients like self.params)."""
        n_layers = len(self.params) // 2
        acts = [X]
        for i in range(n_layers):
            W, b = self.params[2 * i], self.params[2 * i + 1]
            z = acts[-1] @ W.T
            z += b
            if i < n_layers - 1:
                np.maximum(z, 0, out=z)
            acts.append(z)
        # softmax + cross-entropy, log-sum-exp form
        logits = acts[-1]
        shifted = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        sums = exp.sum(axis=1, keepdims=True)
        n = X.shape[0]
        rows = np.arange(n)
        loss = float(np.mean(np.log(sums[:, 0]) - shifted[rows, y]))
        dz = exp / sums
        dz[rows, y] -= 1
        dz /= n
        grads = [None] * len(self.params)
        for i in reversed(range(n_layers)):
            a_prev = acts[i]
            grads[2 * i] = dz.T @ a_prev
            grads[2 * i + 1] = dz.sum(axis=0)
            if i > 0:
                dz = dz @ self.params[2 * i]
                dz *= acts[i] > 0  # ReLU derivative from the stored output
        return loss, grads

    def step(self, grads):
        if self.optimizer == "sgd":
            # torch.optim.SGD, dampening 0: buf = momentum * buf + g; p -= lr * buf
            for p, g, buf in zip(self.params, grads, self.state1):
                buf *= self.momentum
                buf += g
                p -= self.lr * buf
        elif self.optimizer == "adam":
            # torch.optim.Adam (amsgrad off, no weight decay)
            self.t += 1
            b1, b2 = self.betas
            bias1 = 1 - b1 ** self.t
            bias2_sqrt = np.sqrt(1 - b2 ** self.t)
            step_size = self.lr / bias1
            for p, g, m, v in zip(self.params, grads, self.state1, self.state2):
                m *= b1
                m += (1 - b1) * g
                v *= b2
                v += (1 - b2) * g * g
                denom = np.sqrt(v) / bias2_sqrt + self.eps
                p -= step_size * (m / denom)
        else:
            raise ValueError(f"unknown optimizer {self.optimizer!r}")

    def train_step(self, X, y):
        loss, grads = self.gradients(X, y)
        self.step(grads)
        return loss
