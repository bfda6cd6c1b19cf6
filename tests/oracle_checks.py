"""What the tests that compare bpfast with the NumPy oracle (oracle.py) share: a
network described in the oracle's terms, and the closeness they assert."""
import numpy as np


def oracle_spec(net):
    """``(weights, biases, activations)`` of a bpfast network, as oracle.network_forward
    and oracle.network_backward take them (a parameterised activation as (name, param))."""
    weights = [layer.weight for layer in net.layers]
    biases = [layer.bias for layer in net.layers]
    acts = [(layer.activation, layer.activation_param)
            if layer.activation in ("leaky_relu", "elu") else layer.activation
            for layer in net.layers]
    return weights, biases, acts


def assert_close(got, expected, rtol):
    """Relative agreement, measured against the largest magnitude of `expected`."""
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert got.shape == expected.shape
    scale = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale)
