from tests.conftest import compose_config


def test_defaults_compose_to_shapes_resnet_batch():
    cfg = compose_config()
    assert (cfg["dataset"]["name"], cfg["model"]["name"], cfg["norm"]["name"]) == (
        "shapes", "resnet", "batch")
    assert cfg["run_name"] == "shapes-resnet-batch-bs128"
