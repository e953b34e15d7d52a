"""The CPU-only speed paths: decided in one place (CPU only, switchable), and never touching a
forward they did not set."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from lit_rlhf.models import linears
from lit_rlhf.models.cpu_paths import CPU_PATHS, ENV_VAR, cpu_path_enabled, switched_on
from lit_rlhf.models.heads import PolicyWithValueHead, last_block_mlp, last_block_rows
from lit_rlhf.models.linears import onednn_linears
from lit_rlhf.modules.rollout import generate
from tests.conftest import TINY_LLAMA

onednn = pytest.mark.skipif(not linears.onednn_available(), reason="this torch has no oneDNN CPU kernels")


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda", "cuda:1", "xpu", "mps", "meta", None])
@pytest.mark.parametrize("name", CPU_PATHS)
def test_each_path_runs_on_the_cpu_only(name, device):
    expected = device is not None and torch.device(device).type == "cpu"
    assert cpu_path_enabled(name, device, env="1") is expected


def test_the_switch_turns_all_or_some_paths_off():
    assert switched_on("1") == switched_on("all") == set(CPU_PATHS)
    assert switched_on("0") == switched_on("none") == set()
    assert switched_on("rm_last_block_rows") == {"rm_last_block_rows"}
    assert not cpu_path_enabled("onednn_decode_linears", "cpu", env="rm_last_block_rows")
    assert cpu_path_enabled("rm_last_block_rows", "cpu", env="rm_last_block_rows")
    with pytest.raises(ValueError, match="unknown path.*onednn"):
        switched_on("onednn")  # a typo is an error, not a silent "off"
    with pytest.raises(ValueError, match="unknown CPU path"):
        cpu_path_enabled("mlp_cut", "cpu")


def test_the_switch_is_read_from_the_environment_at_each_use(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert switched_on() == set(CPU_PATHS)  # on by default
    monkeypatch.setenv(ENV_VAR, "0")
    assert not any(cpu_path_enabled(name, "cpu") for name in CPU_PATHS)


class _Hooked(nn.Module):
    """A model whose first linear carries an instance forward, as accelerate's ``add_hook_to_module`` sets."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.hook_calls = 0
        original = self.a.forward

        def hooked(x):
            self.hook_calls += 1
            return original(x)

        self.a.forward = hooked
        self.hooked = hooked

    def forward(self, x):
        return self.b(self.a(x))


@onednn
def test_a_layer_with_its_own_instance_forward_keeps_it(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    model = _Hooked()
    with torch.no_grad(), onednn_linears(model):
        assert model.a.forward is model.hooked  # left alone
        assert isinstance(model.b.__dict__.get("forward"), linears._OneDNNForward)  # the plain one runs on oneDNN
        model(torch.randn(2, 8))
    assert model.hook_calls == 1
    assert model.a.forward is model.hooked  # not deleted afterwards
    assert "forward" not in model.b.__dict__


@onednn
def test_a_forward_set_by_someone_else_inside_the_block_stays(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    model = nn.Sequential(nn.Linear(4, 4))
    def other(x):
        return x

    with onednn_linears(model):
        model[0].forward = other  # e.g. a hook attached while sampling
    assert model[0].forward is other


@pytest.mark.parametrize("env", ["0", "rm_last_block_rows"])
def test_switched_off_nothing_is_replaced(monkeypatch, env):
    monkeypatch.setenv(ENV_VAR, env)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with onednn_linears(model):
        assert all("forward" not in layer.__dict__ for layer in model)


def test_a_model_off_the_cpu_is_left_alone(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    model = nn.Sequential(nn.Linear(4, 4)).to("meta")  # stands for a CUDA model: any non-CPU device
    with onednn_linears(model):
        assert "forward" not in model[0].__dict__


def _tiny_lm():
    fields = dict(TINY_LLAMA)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), vocab_size=50, **fields))


@onednn
def test_generate_keeps_a_hooked_layers_forward(monkeypatch):
    monkeypatch.setenv(ENV_VAR, "1")
    policy = PolicyWithValueHead(_tiny_lm(), value_head=False).eval()
    q_proj = policy.base_model.model.layers[0].self_attn.q_proj
    calls = []
    original = q_proj.forward

    def hooked(x):
        calls.append(x.shape[1])
        return original(x)

    q_proj.forward = hooked
    query = torch.randint(2, 50, (2, 5))
    generate(policy, query, torch.ones_like(query), torch.tensor([4, 4]), eos_token_id=None, pad_token_id=0,
             generator=torch.Generator().manual_seed(0))
    assert calls == [5, 1, 1, 1]  # the prefill and three decode steps went through the hook
    assert q_proj.forward is hooked
    others = [m for m in policy.modules() if isinstance(m, nn.Linear) and m is not q_proj]
    assert others and all("forward" not in m.__dict__ for m in others)


@pytest.mark.parametrize("env", ["1", "0"])
def test_the_last_block_cut_follows_the_switch(monkeypatch, env):
    monkeypatch.setenv(ENV_VAR, env)
    trunk = _tiny_lm().model
    mlp = last_block_mlp(trunk)
    rows = []
    with torch.no_grad(), last_block_rows(trunk, torch.tensor([3, 9])):
        # Registered after the cut's hooks: sees the input the MLP computes on.
        handle = mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].size(1)))
        trunk(input_ids=torch.randint(0, 50, (1, 10)))
        handle.remove()
    assert rows == ([2] if env == "1" else [10])
