"""PyTorch eager: nn.Sequential of Linear + ReLU, torch.optim.SGD / Adam."""
import importlib
import itertools

LIBRARIES = {"torch": lambda: importlib.import_module("torch")}


def model(p, hidden_block=None):
    """nn.Sequential of p's Linear layers (its weights); after each hidden one, the
    modules hidden_block(width) returns (default: a ReLU)."""
    import torch
    mods = []
    for i, (W, b) in enumerate(zip(p.weights, p.biases)):
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        mods.append(lin)
        if i < len(p.weights) - 1:
            mods += hidden_block(W.shape[0]) if hidden_block else [torch.nn.ReLU()]
    return torch.nn.Sequential(*mods)


def train_step(p, opt):
    import torch
    net = model(p)
    loss_fn = torch.nn.CrossEntropyLoss()
    if opt == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = itertools.cycle([(torch.from_numpy(X), torch.from_numpy(y))
                               for X, y in p.batches])

    def step():
        X, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(X), y)
        loss.backward()
        optimizer.step()
        return loss
    return step, 1


def predict(p, n):
    import numpy as np
    import torch
    net = model(p)
    X = torch.from_numpy(np.ascontiguousarray(p.X[:n]))

    def run():
        with torch.no_grad():
            return net(X)
    return run


def gemm_functions(a, b, out):
    import torch
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    return {"torch": lambda: torch.mm(ta, tb, out=tout)}


TRAIN = {"torch": train_step}
PREDICT = {"torch": predict}
