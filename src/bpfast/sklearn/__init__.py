"""scikit-learn estimators that train on bpfast's engine: MLPClassifier and MLPRegressor.

They take scikit-learn's ``sklearn.neural_network`` parameters with the same
names and meanings, expose the same fitted attributes, and pass scikit-learn's
``check_estimator``. What runs underneath is a :class:`bpfast.Network`: each
``fit``/``partial_fit`` of ``sgd``/``adam`` checks its data once and then runs
every epoch as one compiled call (one ``Trainer.run(1)`` of the network's
training loop), every ``lbfgs`` function evaluation is one compiled
forward-and-backward (``Network.compute_gradients``) on the flat parameter
vector. Only scikit-learn's per-epoch bookkeeping (loss curve, convergence test,
early stopping, learning-rate schedule) runs in Python here.

A failed ``fit``/``partial_fit`` (bad parameters, data, weights, or a validation
split that cannot be made) leaves a fitted estimator as it was: everything is
checked and the new network is built before any fitted attribute is assigned.

scikit-learn is an optional dependency of bpfast: ``import bpfast`` never imports
this module, and importing this module needs scikit-learn 1.6 or newer.

Where the arithmetic differs from scikit-learn
----------------------------------------------
* Several outputs of a regression: scikit-learn reports the squared error
  averaged over outputs but follows the gradient of its *sum* over outputs. Here
  the loss that is reported (``loss_``, ``loss_curve_``) is the one whose gradient
  is followed: summed over outputs, averaged over samples, so ``loss_`` is
  ``n_outputs_`` times scikit-learn's. ``sgd``/``adam`` take scikit-learn's steps;
  ``lbfgs`` does not retrace scikit-learn's fit there, because scikit-learn hands
  L-BFGS-B a loss and a gradient that do not match (its line searches see the
  averaged loss) and bpfast a matching pair. Multilabel log-loss is summed over
  labels in both, so there both agree.
* The optimizers are bpfast's (PyTorch's update rules). SGD with (Nesterov)
  momentum takes scikit-learn's steps, also when ``learning_rate`` changes the rate
  (the momentum buffer is rescaled then, see ``_set_learning_rate``). Adam adds
  ``epsilon`` after the bias correction of the second moment, scikit-learn before
  it (a difference of order ``epsilon``).
* The L2 penalty of a mini-batch is ``0.5 * alpha * ||W||^2 / batch_size`` for
  every batch, also the last, smaller one (scikit-learn divides by that batch's
  size); with sample weights ``batch_size`` becomes ``batch_size * mean(weight)``,
  scikit-learn's batch weight sum on average.
"""
from ._base import _BaseMLP  # noqa: F401  (first: it says what to install without scikit-learn)
from ._classifier import MLPClassifier
from ._regressor import MLPRegressor

__all__ = ["MLPClassifier", "MLPRegressor"]
