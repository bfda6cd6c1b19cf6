"""scikit-learn's MLPClassifier: one partial_fit call is one epoch over the data set."""
import importlib
import sys
import warnings

LIBRARIES = {"sklearn": lambda: (importlib.import_module("sklearn.neural_network")
                                 and sys.modules["sklearn"])}


def partial_fit(p, opt):
    import numpy as np
    from sklearn.neural_network import MLPClassifier
    common = {"hidden_layer_sizes": tuple(p.widths[1:-1]), "activation": "relu",
              "alpha": 0.0, "batch_size": p.batch, "shuffle": True, "random_state": 0}
    if opt == "sgd":
        clf = MLPClassifier(solver="sgd", learning_rate_init=0.01, momentum=0.9,
                            nesterovs_momentum=False, **common)
    else:
        clf = MLPClassifier(solver="adam", learning_rate_init=1e-3, **common)
    classes = np.arange(p.widths[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(p.X, p.y, classes=classes)  # first call allocates and initializes

    def epoch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.partial_fit(p.X, p.y)
        return clf.loss_
    return epoch, p.n_batches


TRAIN = {"sklearn": partial_fit}
PREDICT = {}
