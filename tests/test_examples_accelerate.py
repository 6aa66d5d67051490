"""The example accelerate configs in examples/: they parse (with yaml and with Accelerate's own
config reader) and their values agree with each other and with how --fsdp is used."""

from pathlib import Path

import pytest
import yaml

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = {
    "accelerate_1x8_ddp.yaml": 1,
    "accelerate_1x8_fsdp.yaml": 1,
    "accelerate_2x8_fsdp.yaml": 2,
}


@pytest.mark.parametrize(("name", "machines"), CONFIGS.items())
def test_example_accelerate_config_is_consistent(name, machines):
    from accelerate.commands.config.config_args import ClusterConfig

    path = EXAMPLES / name
    cfg = yaml.safe_load(path.read_text())
    assert cfg["num_machines"] == machines
    assert cfg["num_processes"] == machines * 8  # 8 GPUs per machine
    assert cfg["distributed_type"] == "MULTI_GPU" and cfg["use_cpu"] is False
    assert 0 <= cfg["machine_rank"] < machines
    # dmdctl shards itself: no Accelerate FSDP/DeepSpeed section (refused, see runtime.py)
    assert not {"fsdp_config", "deepspeed_config"} & set(cfg)
    if machines > 1:
        assert cfg["main_process_ip"] and isinstance(cfg["main_process_port"], int)
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert ("distill --fsdp" in header) == ("fsdp" in name)
    loaded = ClusterConfig.from_yaml_file(str(path))  # Accelerate reads it as it is
    assert loaded.num_processes == cfg["num_processes"]
