"""Saving and loading: exact round trips, resumable training, atomic writes, hostile files."""
import io
import json
import os
import pathlib
import pickle
import stat
import tempfile
import threading
import zipfile

import numpy as np
import pytest

import bpfast as bp
from bpfast import io as bpio

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the property test skips; the rest run
    given = settings = st = None

RNG = np.random.default_rng(1234)
X = RNG.normal(size=(40, 5))
LABELS = RNG.integers(0, 3, size=40)


def make_network(dtype="float64", seed=3):
    return bp.Network([bp.Dense(5, 7, activation="leaky_relu", negative_slope=0.2),
                       bp.Dense(7, 6, activation="elu", alpha=0.7, bias=False),
                       bp.Dense(6, 3)], dtype=dtype, seed=seed)


OPTIMIZERS = [
    lambda: bp.SGD(lr=0.05),
    lambda: bp.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
    lambda: bp.Adam(lr=0.01, amsgrad=True),
    lambda: bp.AdamW(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1),
    lambda: bp.RMSprop(lr=0.01, momentum=0.5, centered=True),
    lambda: bp.Adagrad(lr=0.1, lr_decay=0.01, initial_accumulator_value=0.1),
]


def arrays_of(path):
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def header_of(path):
    return json.loads(arrays_of(path)["header"].tobytes())


def write_npz(path, arrays):
    with open(path, "wb") as file:
        np.savez(file, **arrays)


def with_header(arrays, **changes):
    header = json.loads(arrays["header"].tobytes())
    header.update(changes)
    arrays = dict(arrays)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    return arrays


@pytest.fixture
def saved(tmp_path):
    """A float64 network trained a little, saved with its Adam state; (path, net, opt)."""
    net = make_network()
    opt = bp.Adam(lr=0.01)
    for _ in range(3):
        net.train_step(X, LABELS, bp.CrossEntropy(), opt)
    path = tmp_path / "model.npz"
    bp.save(net, path, optimizer=opt)
    return path, net, opt


# --------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    net = make_network(dtype)
    net.parameters[:] = RNG.normal(size=net.n_parameters)
    path = tmp_path / "m.npz"
    net.save(path)
    loaded = bp.load(path)
    assert isinstance(loaded, bp.Network)
    assert loaded.dtype == net.dtype and loaded.seed == net.seed
    assert loaded.parameters.tobytes() == net.parameters.tobytes()
    assert repr(loaded) == repr(net)
    for a, b in zip(net.layers, loaded.layers, strict=True):
        assert (a.in_features, a.out_features, a.activation, a.use_bias, a.activation_param) \
            == (b.in_features, b.out_features, b.activation, b.use_bias, b.activation_param)
    np.testing.assert_array_equal(loaded.predict(X), net.predict(X))


def _any_architecture_round_trips(sizes, activations, bias, dtype, seed):
    layers = [bp.Dense(a, b, activation=activations[i % 3], bias=bias)
              for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))]
    net = bp.Network(layers, dtype=dtype, seed=seed)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "m.npz")
        bp.save(net, path)
        loaded = bp.load(path)
    assert repr(loaded) == repr(net) and loaded.seed == seed
    assert loaded.parameters.tobytes() == net.parameters.tobytes()


if given is None:
    @pytest.mark.skip(reason="needs hypothesis")
    def test_any_architecture_round_trips():
        pass
else:
    test_any_architecture_round_trips = settings(max_examples=25, deadline=None)(given(
        sizes=st.lists(st.integers(1, 6), min_size=2, max_size=4),
        activations=st.lists(st.sampled_from(["identity", "sigmoid", "tanh", "relu", "gelu",
                                              "softplus", "leaky_relu", "elu"]),
                             min_size=3, max_size=3),
        bias=st.booleans(), dtype=st.sampled_from(["float32", "float64"]),
        seed=st.one_of(st.none(), st.integers(0, 2**63)))(_any_architecture_round_trips))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make_optimizer", OPTIMIZERS)
def test_training_resumes_exactly(tmp_path, dtype, make_optimizer):
    net, opt = make_network(dtype), make_optimizer()
    loss = bp.CrossEntropy()
    for _ in range(4):
        net.train_step(X, LABELS, loss, opt)
    opt.lr = opt.lr / 2  # a changed learning rate is saved as it is now
    path = tmp_path / "m.npz"
    net.save(path, optimizer=opt)
    loaded, loaded_opt = bp.load(path, with_optimizer=True)
    assert type(loaded_opt) is type(opt)
    assert loaded_opt.step_count == opt.step_count == 4 and loaded_opt.lr == opt.lr
    assert loaded_opt.state.keys() == opt.state.keys()
    for name in opt.state:
        assert loaded_opt.state[name].tobytes() == opt.state[name].tobytes()
    assert loaded.parameters.tobytes() == net.parameters.tobytes()
    for _ in range(3):  # the twin that was never saved and the loaded one step alike
        assert loaded.train_step(X, LABELS, loss, loaded_opt) == \
            net.train_step(X, LABELS, loss, opt)
    assert loaded.parameters.tobytes() == net.parameters.tobytes()


def test_fit_continues_with_the_same_shuffling(tmp_path):
    net, opt = make_network(seed=7), bp.SGD(lr=0.05, momentum=0.9)
    net.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=8)
    net.save(tmp_path / "m.npz", optimizer=opt)
    loaded, loaded_opt = bp.load(tmp_path / "m.npz", with_optimizer=True)
    a = net.fit(X, LABELS, loss="cross_entropy", optimizer=opt, epochs=2, batch_size=8)
    b = loaded.fit(X, LABELS, loss="cross_entropy", optimizer=loaded_opt, epochs=2,
                   batch_size=8)
    assert a.history["loss"] == b.history["loss"]
    assert loaded.parameters.tobytes() == net.parameters.tobytes()
    if hasattr(net, "epochs_trained"):  # the count continues across save and load
        assert loaded.epochs_trained == net.epochs_trained == 4


def test_optimizer_that_never_stepped(tmp_path):
    net, opt = make_network(), bp.Adam(lr=0.02)
    net.save(tmp_path / "m.npz", optimizer=opt)
    assert header_of(tmp_path / "m.npz")["optimizer"]["has_state"] is False
    loaded, loaded_opt = bp.load(tmp_path / "m.npz", with_optimizer=True)
    assert loaded_opt.step_count == 0 and loaded_opt.state == {}
    assert loaded.train_step(X, LABELS, "cross_entropy", loaded_opt) == \
        net.train_step(X, LABELS, "cross_entropy", opt)
    assert loaded.parameters.tobytes() == net.parameters.tobytes()


def test_loaded_optimizer_belongs_to_the_loaded_network(saved):
    path, _, _ = saved
    loaded, loaded_opt = bp.load(path, with_optimizer=True)
    other = make_network()
    with pytest.raises(ValueError, match="another Network"):
        other.train_step(X, LABELS, "cross_entropy", loaded_opt)


def test_without_optimizer(saved, tmp_path):
    path, net, opt = saved
    bp.save(net, tmp_path / "plain.npz")
    assert bp.load(tmp_path / "plain.npz", with_optimizer=True)[1] is None
    assert "optimizer_state" not in arrays_of(tmp_path / "plain.npz")


def test_header_fields_and_metadata(saved, tmp_path):
    path, net, opt = saved
    header = bpio.read_header(path)
    assert header["format"] == "bpfast-model" and header["format_version"] == 1
    assert header["bpfast_version"] == bp.__version__ and header["dtype"] == "float64"
    assert header["n_parameters"] == net.n_parameters and header["seed"] == 3
    assert header["layers"][0] == {"in_features": 5, "out_features": 7,
                                   "activation": "leaky_relu", "bias": True,
                                   "activation_param": 0.2}
    assert header["optimizer"]["name"] == "Adam"
    assert header["optimizer"]["step_count"] == 3
    assert header["optimizer"]["state_names"] == ["exp_avg", "exp_avg_sq"]
    members = arrays_of(path)
    assert set(members) == {"header", "parameters", "optimizer_state"}
    assert members["header"].dtype == np.uint8 and members["header"].ndim == 1
    assert members["optimizer_state"].shape == (2, net.n_parameters)
    # caller's metadata comes back; what JSON cannot hold is refused before writing
    net.save(tmp_path / "meta.npz", metadata={"classes": ["a", "b"], "scale": [0.5]})
    assert bpio.read_header(tmp_path / "meta.npz")["metadata"] == {"classes": ["a", "b"],
                                                                   "scale": [0.5]}
    with pytest.raises(ValueError, match="JSON"):
        net.save(tmp_path / "bad.npz", metadata={"x": object()})
    with pytest.raises(ValueError, match="JSON"):
        net.save(tmp_path / "bad.npz", metadata={"x": float("nan")})
    assert not (tmp_path / "bad.npz").exists()


def test_path_is_used_as_given(tmp_path):
    net = make_network()
    bp.save(net, str(tmp_path / "model.bin"))
    assert os.listdir(tmp_path) == ["model.bin"]
    assert bp.load(str(tmp_path / "model.bin")).parameters.tobytes() == \
        net.parameters.tobytes()


def test_save_refuses_a_foreign_optimizer(tmp_path):
    net, other, opt = make_network(), make_network(), bp.SGD(lr=0.1, momentum=0.5)
    other.train_step(X, LABELS, "cross_entropy", opt)
    with pytest.raises(ValueError, match="another Network"):
        net.save(tmp_path / "m.npz", optimizer=opt)
    with pytest.raises(TypeError):
        net.save(tmp_path / "m.npz", optimizer="adam")
    with pytest.raises(TypeError):
        bp.save("not a network", tmp_path / "m.npz")
    assert not (tmp_path / "m.npz").exists()


# --------------------------------------------------------------------------- atomic writes
@pytest.mark.parametrize("fail_in", ["savez", "replace"])
def test_a_failed_save_keeps_the_old_file(saved, monkeypatch, fail_in):
    path, net, _ = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        if fail_in == "savez":
            args[0].write(b"PK\x03\x04 half a file")
        raise OSError("disk full (simulated)")

    if fail_in == "savez":
        monkeypatch.setattr(bpio.np, "savez", crash)
    else:
        monkeypatch.setattr(bpio.os, "replace", crash)
    net.parameters[:] = 0.0
    with pytest.raises(OSError, match="simulated"):
        net.save(path)
    assert path.read_bytes() == before
    assert os.listdir(path.parent) == [path.name]  # no temporary file left behind


def test_interrupted_save_leaves_no_temporary_file(saved, monkeypatch):
    path, net, _ = saved
    monkeypatch.setattr(bpio.os, "fsync", lambda fd: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        net.save(path)
    assert os.listdir(path.parent) == [path.name]


# --------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(saved, fraction):
    path, _, _ = saved
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * fraction)])
    with pytest.raises(ValueError, match=str(path).replace("\\", "\\\\")):
        bp.load(path)


def test_corrupted_bytes(saved):
    path, net, _ = saved
    data = bytearray(path.read_bytes())
    # flip bytes inside the parameters' data: the zip's CRC catches it
    start = bytes(data).index(net.parameters[:4].tobytes())
    data[start + 8:start + 16] = bytes(8)
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.npz.*corrupted"):
        bp.load(path)


def test_random_damage_is_always_a_clear_error(saved):
    path, _, _ = saved
    original = path.read_bytes()
    rng = np.random.default_rng(0)
    for _ in range(60):
        data = bytearray(original)
        for position in rng.integers(0, len(data), size=rng.integers(1, 4)):
            data[position] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        try:
            bp.load(path, with_optimizer=True)
        except ValueError as error:
            assert str(path) in str(error)
        # a flip in an unused field (a timestamp, say) may leave a valid file: fine


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x05\x06" + bytes(18)])
def test_not_a_model_file(tmp_path, content):
    path = tmp_path / "junk.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="junk.npz"):
        bp.load(path)


def test_missing_file_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        bp.load(tmp_path / "nothing.npz")


def test_plain_npy_is_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    with pytest.raises(ValueError, match="a.npy.*not an .npz"):
        bp.load(tmp_path / "a.npy")


# --------------------------------------------------------------------------- hostile files
class _Payload:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


@pytest.mark.parametrize("member", ["parameters", "header", "optimizer_state", "extra"])
def test_object_arrays_are_never_unpickled(saved, tmp_path, member):
    path, _, _ = saved
    marker = tmp_path / "code-ran"
    evil = np.empty(1, dtype=object)
    evil[0] = _Payload(str(marker))
    buffer = io.BytesIO()
    np.save(buffer, evil, allow_pickle=True)
    # sanity: this payload really would run if unpickled
    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "sanity"))))
    assert (tmp_path / "sanity").exists()
    arrays = arrays_of(path)
    with zipfile.ZipFile(path, "w") as archive:
        for key, value in arrays.items():
            if key != member:
                stream = io.BytesIO()
                np.save(stream, value)
                archive.writestr(key + ".npy", stream.getvalue())
        archive.writestr(member + ".npy", buffer.getvalue())
    with pytest.raises(ValueError, match="Python objects"):
        bp.load(path, with_optimizer=True)
    with pytest.raises(ValueError):
        bpio.read_header(path)
    assert not marker.exists()


def test_a_pickle_file_is_not_loaded(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.npz"
    path.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(ValueError, match="evil.npz"):
        bp.load(path)
    assert not marker.exists()


def test_newer_format_version(saved):
    path, _, _ = saved
    newer = bp.io.FORMAT_VERSION + 1
    write_npz(path, with_header(arrays_of(path), format_version=newer, bpfast_version="9.0"))
    with pytest.raises(ValueError, match=f"written by a newer bpfast.*format version {newer}"):
        bp.load(path)


@pytest.mark.parametrize("changes, message", [
    ({"format": "something-else"}, "not a bpfast model"),
    ({"format_version": "1"}, "format version"),
    ({"format_version": 0}, "format version"),
    ({"dtype": "float16"}, "dtype"),
    ({"dtype": "object"}, "dtype"),
    ({"layers": []}, "layers"),
    ({"layers": [{"in_features": 5}]}, "layer 0"),
    ({"layers": [{"in_features": 5, "out_features": -3, "activation": "relu", "bias": True,
                  "activation_param": 0.0}]}, "out_features"),
    ({"layers": [{"in_features": 5, "out_features": 3, "activation": "swish", "bias": True,
                  "activation_param": 0.0}]}, "activation"),
    ({"layers": [{"in_features": 5, "out_features": 3, "activation": "relu", "bias": 1,
                  "activation_param": 0.0}]}, "bias"),
    ({"seed": -1}, "seed"),
    ({"seed": "x"}, "seed"),
    ({"n_parameters": 12}, "parameters"),
    ({"optimizer": {"name": "LBFGS"}}, "optimizer"),
    ({"metadata": [1, 2]}, "metadata"),
])
def test_invalid_headers(saved, changes, message):
    path, _, _ = saved
    arrays = arrays_of(path)
    del arrays["optimizer_state"]
    arrays = with_header(arrays, optimizer=None)
    write_npz(path, with_header(arrays, **changes))
    with pytest.raises(ValueError, match=message):
        bp.load(path)


@pytest.mark.parametrize("header", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_header_that_is_not_a_json_object(saved, header):
    path, _, _ = saved
    arrays = arrays_of(path)
    arrays["header"] = np.frombuffer(header, dtype=np.uint8)
    write_npz(path, arrays)
    with pytest.raises(ValueError, match="model.npz"):
        bp.load(path)


def test_header_of_the_wrong_kind(saved):
    path, _, _ = saved
    arrays = arrays_of(path)
    arrays["header"] = np.array(arrays["header"].tobytes().decode())  # 0-d unicode
    write_npz(path, arrays)
    with pytest.raises(ValueError, match="uint8"):
        bp.load(path)


@pytest.mark.parametrize("key, value, message", [
    ("parameters", np.zeros(5), "shape"),
    ("parameters", np.zeros((2, 3)), "shape"),
    ("parameters", None, "missing array 'parameters'"),
    ("optimizer_state", np.zeros((3, 5)), "shape"),
    ("optimizer_state", None, "missing array 'optimizer_state'"),
    ("header", None, "no header"),
    ("extra", np.zeros(3), "unexpected array 'extra'"),
])
def test_wrong_or_missing_arrays(saved, key, value, message):
    path, _, _ = saved
    arrays = arrays_of(path)
    if value is None:
        del arrays[key]
    else:
        arrays[key] = value
    write_npz(path, arrays)
    with pytest.raises(ValueError, match=message):
        bp.load(path, with_optimizer=True)


def test_wrong_dtype_and_nonfinite_parameters(saved):
    path, net, _ = saved
    arrays = arrays_of(path)
    write_npz(path, dict(arrays, parameters=np.zeros(net.n_parameters, dtype=np.int64)))
    with pytest.raises(ValueError, match="dtype"):
        bp.load(path)
    bad = arrays["parameters"].copy()
    bad[3] = np.nan
    write_npz(path, dict(arrays, parameters=bad))
    with pytest.raises(ValueError, match="NaN"):
        bp.load(path)


def test_big_endian_parameters_are_read(saved):
    path, net, _ = saved
    arrays = arrays_of(path)
    write_npz(path, dict(arrays, parameters=arrays["parameters"].astype(">f8"),
                         optimizer_state=arrays["optimizer_state"].astype(">f8")))
    assert bp.load(path).parameters.tobytes() == net.parameters.tobytes()


def test_huge_declared_sizes_are_refused_before_allocating(saved):
    path, _, _ = saved
    arrays = arrays_of(path)
    del arrays["optimizer_state"]
    huge_layers = [{"in_features": 10**9, "out_features": 10**9, "activation": "identity",
                    "bias": True, "activation_param": 0.0}]
    write_npz(path, with_header(arrays, optimizer=None, layers=huge_layers,
                                n_parameters=10**18 + 10**9))
    with pytest.raises(ValueError, match="shape"):
        bp.load(path)
    # an .npy header that declares 8 TB of parameters backed by a few bytes
    stream = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        stream, {"descr": "<f8", "fortran_order": False, "shape": (10**12,)})
    stream.write(bytes(64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("header.npy", _npy_bytes(arrays["header"]))
        archive.writestr("parameters.npy", stream.getvalue())
    with pytest.raises(ValueError, match="declares shape"):
        bp.load(path)


def _npy_bytes(array):
    stream = io.BytesIO()
    np.save(stream, array)
    return stream.getvalue()


def test_a_schedule_resumes_exactly_after_load(tmp_path):
    from bpfast.schedules import StepDecay
    X_, y_ = X, LABELS
    twin, opt = make_network(), bp.SGD(lr=0.1)
    net, opt2 = make_network(), bp.SGD(lr=0.1)
    for model, optimizer in ((twin, opt), (net, opt2)):
        model.fit(X_, y_, loss="cross_entropy", optimizer=optimizer, epochs=2,
                  schedule=StepDecay(1, 0.5))
    path = tmp_path / "scheduled.npz"
    bp.save(net, path, optimizer=opt2)
    loaded, loaded_opt = bp.load(path, with_optimizer=True)
    assert loaded_opt.initial_lr == 0.1
    for model, optimizer in ((twin, opt), (loaded, loaded_opt)):
        model.fit(X_, y_, loss="cross_entropy", optimizer=optimizer, epochs=1,
                  schedule=StepDecay(1, 0.5))
    assert loaded_opt.lr == opt.lr
    np.testing.assert_array_equal(loaded.parameters, twin.parameters)


def test_compressed_members_are_refused(saved, tmp_path):
    path, _, _ = saved
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    compressed = tmp_path / "compressed.npz"
    np.savez_compressed(compressed, **arrays)
    with pytest.raises(ValueError, match="compressed"):
        bp.load(compressed)


@pytest.mark.parametrize("field", ["seed", "optimizer"])
def test_header_without_a_required_field(saved, tmp_path, field):
    path, _, _ = saved
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    header = json.loads(arrays["header"].tobytes())
    del header[field]
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    broken = tmp_path / "broken.npz"
    np.savez(broken, **arrays)
    with pytest.raises(ValueError, match=f"missing field '{field}'"):
        bp.load(broken)


# --------------------------------------------------------------------------- out-of-range headers
def _rewrite_header(path, change):
    arrays = arrays_of(path)
    header = header_of(path)
    change(header)
    arrays["header"] = np.frombuffer(json.dumps(header).encode(), dtype=np.uint8)
    write_npz(path, arrays)


def _set(*keys_and_value):
    *keys, last, value = keys_and_value

    def change(header):
        for key in keys:
            header = header[key]
        header[last] = value
    return change


OUT_OF_RANGE = [
    (_set("rng_state", "state", "state", 2**200), "rng_state"),
    (_set("rng_state", "has_uint32", 2**70), "rng_state"),
    (_set("rng_state", "uinteger", -1), "rng_state"),
    (_set("rng_state", "state", 3), "rng_state"),
    (_set("rng_state", {"bit_generator": "os.system", "state": {}}), "rng_state"),
    (_set("optimizer", "step_count", 2**63), "step_count"),
    (_set("optimizer", "step_count", 2**64 + 1), "step_count"),
    (_set("optimizer", "hyperparameters", "lr", 10**400), "'lr'"),
    (_set("optimizer", "hyperparameters", "eps", -10**400), "'eps'"),
    (_set("optimizer", "hyperparameters", "betas", [10**400, 0.999]), "'betas'"),
    (_set("optimizer", "initial_lr", 10**400), "initial_lr"),
    (_set("epochs_trained", 2**63), "epochs_trained"),
    (_set("layers", 0, "activation_param", 10**400), "activation_param"),
    (_set("n_parameters", 10**400), "parameters"),
    (_set("seed", -1), "seed"),
]


@pytest.mark.parametrize("change, field", OUT_OF_RANGE)
@pytest.mark.parametrize("read", ["read_header", "load", "load_with_optimizer"])
def test_out_of_range_header_values_are_value_errors(saved, change, field, read):
    # each of these gave a bare OverflowError (or loaded) before; now the file and the
    # field are named, and read_header refuses what load would refuse
    path, _, _ = saved
    _rewrite_header(path, change)
    reader = {"read_header": bpio.read_header, "load": bp.load,
              "load_with_optimizer": lambda p: bp.load(p, with_optimizer=True)}[read]
    with pytest.raises(ValueError) as caught:
        reader(path)
    assert str(path) in str(caught.value) and field in str(caught.value)
    assert type(caught.value) is not OverflowError and len(str(caught.value)) < 400


def test_deeply_nested_metadata_is_a_value_error(saved):
    path, _, _ = saved
    arrays = arrays_of(path)
    text = arrays["header"].tobytes().decode()
    depth = 200_000  # far past the interpreter's recursion limit
    text = text.replace('"metadata": {}', '"metadata": {"deep": ' + "[" * depth + "]" * depth
                        + "}")
    assert "deep" in text
    arrays["header"] = np.frombuffer(text.encode(), dtype=np.uint8)
    write_npz(path, arrays)
    for reader in (bpio.read_header, bp.load):
        with pytest.raises(ValueError, match=f"{path.name}.*nests"):
            reader(path)


def test_saving_deeply_nested_metadata_is_a_value_error(tmp_path):
    nested = []
    for _ in range(100_000):
        nested = [nested]
    with pytest.raises(ValueError, match="metadata nests"):
        bp.save(make_network(), tmp_path / "deep.npz", metadata={"deep": nested})
    assert os.listdir(tmp_path) == []


def test_a_huge_seed_still_loads(saved):
    # numpy seeds take any non-negative integer: a large one is not out of range
    path, _, _ = saved
    _rewrite_header(path, _set("seed", 2**200))
    assert bp.load(path).seed == 2**200


# --------------------------------------------------------------------------- special files
def _refused_without_blocking(reader, path):
    """reader(path)'s exception; fails (instead of hanging) if reader blocks on path."""
    outcome = {}

    def attempt():
        try:
            reader(path)
        except BaseException as error:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = error

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        if stat.S_ISFIFO(os.stat(path).st_mode):
            with open(path, "wb"):  # a writer releases a reader blocked in open()
                pass
        thread.join(30)
        pytest.fail(f"{reader.__name__} blocked on {path}")
    return outcome.get("error")


def _special_files(tmp_path):
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    specials = [fifo, tmp_path]
    if os.path.exists("/dev/zero"):
        specials.append(pathlib.Path("/dev/zero"))
    return specials


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
@pytest.mark.parametrize("reader", [bp.load, bpio.read_header])
def test_special_files_are_refused_as_load_sources(tmp_path, reader):
    for special in _special_files(tmp_path):
        error = _refused_without_blocking(reader, special)
        assert isinstance(error, ValueError), (special, error)
        assert str(special) in str(error) and "not a regular file" in str(error)


def test_load_follows_a_symbolic_link(saved, tmp_path):
    path, net, _ = saved
    link = tmp_path / "link.npz"
    link.symlink_to(path)
    assert bp.load(link).parameters.tobytes() == net.parameters.tobytes()


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_save_refuses_a_fifo_and_a_directory(tmp_path):
    fifo = tmp_path / "model.npz"
    os.mkfifo(fifo)
    directory = tmp_path / "folder.npz"
    directory.mkdir()
    for target in (fifo, directory):
        with pytest.raises(ValueError, match=f"{target.name}: not a regular file"):
            bp.save(make_network(), target)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode) and directory.is_dir()
    assert sorted(os.listdir(tmp_path)) == ["folder.npz", "model.npz"]  # no temporary left


@pytest.mark.skipif(not os.path.exists("/dev/null"), reason="needs /dev/null")
def test_save_to_dev_null_fails_before_touching_it(monkeypatch):
    # As root, renaming over /dev/null would replace the device with a file. This test
    # cannot do that even where the check is missing: nothing may be created or renamed.
    before = os.stat("/dev/null")

    def forbidden(*args, **kwargs):
        raise AssertionError(f"save tried to write: {args}")
    monkeypatch.setattr(bpio.os, "replace", forbidden)
    monkeypatch.setattr(bpio.os, "fdopen", forbidden)
    with pytest.raises(ValueError, match="/dev/null: not a regular file"):
        bp.save(make_network(), "/dev/null")
    monkeypatch.undo()
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode)
    assert (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)


@pytest.mark.parametrize("dangling", [False, True])
def test_save_writes_through_a_symbolic_link(tmp_path, dangling):
    target = tmp_path / "real" / "model.npz"
    target.parent.mkdir()
    if not dangling:
        target.write_bytes(b"old")
        os.chmod(target, 0o600)
    link = tmp_path / "link.npz"
    link.symlink_to(target)
    net = make_network()
    bp.save(net, link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert bp.load(target).parameters.tobytes() == net.parameters.tobytes()
    if not dangling:
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
    assert os.listdir(target.parent) == ["model.npz"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o604])
def test_resaving_keeps_the_permission_bits(tmp_path, mode):
    path = tmp_path / "model.npz"
    bp.save(make_network(), path)
    os.chmod(path, mode)
    bp.save(make_network(seed=9), path)
    assert stat.S_IMODE(os.stat(path).st_mode) == mode
    assert bp.load(path).seed == 9


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_a_new_file_gets_the_umask_mode(tmp_path):
    previous = os.umask(0o027)
    try:
        bp.save(make_network(), tmp_path / "model.npz")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "model.npz").st_mode) == 0o640
