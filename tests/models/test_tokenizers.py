"""Tokenizer quirks through every stage: no pad token, BOS added or not, left padding.

Three setups built from the demo tokenizer:

* ``plain``: a dedicated pad token, no BOS (GPT-style BPE);
* ``no_pad``: no pad token at all (GPT-2, Llama): :func:`load_tokenizer` pads with EOS;
* ``bos_no_pad``: adds BOS in front of every text and has no pad token (Llama-style).
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lit_rlhf.data import ConstantLengthDataset
from lit_rlhf.data.packing import adds_bos
from lit_rlhf.data.preference import collate_pairs, pack_pairs
from lit_rlhf.models import LoraSettings, ModelConfig, load_tokenizer
from lit_rlhf.modules import PPOModule, RewardModule
from lit_rlhf.modules.ppo import PPOConfig, SamplingConfig
from lit_rlhf.modules.rollout import Rollout, decode_responses, evaluate_actions
from tests.conftest import TINY_LLAMA
from tests.modules.ppo_helpers import LetterReward, make_batch

SETUPS = ["plain", "no_pad", "bos_no_pad"]


@pytest.fixture(scope="module")
def tokenizer_dirs(demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    out = {"plain": str(demo.tokenizer_dir)}
    no_pad = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    no_pad.pad_token = None
    no_pad.save_pretrained(root / "no_pad")
    out["no_pad"] = str(root / "no_pad")
    bos = AutoTokenizer.from_pretrained(demo.tokenizer_dir)
    bos.pad_token = None
    bos.add_special_tokens({"bos_token": "<|bos|>"})
    bos.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", bos.bos_token_id)])
    bos.save_pretrained(root / "bos_no_pad")
    out["bos_no_pad"] = str(root / "bos_no_pad")
    return out


@pytest.mark.parametrize("setup", SETUPS)
def test_loaded_tokenizers_can_pad_and_say_whether_they_add_bos(setup, tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs[setup])
    assert tok.pad_token_id is not None
    assert (tok.pad_token_id == tok.eos_token_id) == (setup != "plain")
    assert adds_bos(tok) == (setup == "bos_no_pad")


@pytest.mark.parametrize("setup", SETUPS)
def test_packed_documents_start_with_bos_exactly_when_the_tokenizer_adds_it(setup, tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs[setup])
    rows = [{"text": "A good film."}, {"text": "A bad one, sadly."}] * 8
    chunk = next(iter(ConstantLengthDataset(rows, tok, seq_length=32)))
    ids, pos = chunk["input_ids"], chunk["position_ids"]
    doc = tok("A good film.", add_special_tokens=False)["input_ids"]
    expected = ([tok.bos_token_id] if setup == "bos_no_pad" else []) + doc + [tok.eos_token_id]
    assert ids[: len(expected)].tolist() == expected
    assert pos[len(expected)].item() == 0  # the next document starts (with its BOS, if any)


@pytest.mark.parametrize("setup", SETUPS)
def test_reward_model_scores_packed_and_padded_alike(setup, tokenizer_dirs):
    module = RewardModule(ModelConfig(arch=TINY_LLAMA, tokenizer=tokenizer_dirs[setup]))
    module.configure_model()
    module.eval()
    tok = module.tokenizer
    texts = ["A good film.", "A bad one, sadly.", "It is fine.", "The best of the year!"]
    ids = tok(texts)["input_ids"]
    if setup == "bos_no_pad":
        assert all(row[0] == tok.bos_token_id for row in ids)
    pairs = [(ids[0], ids[1], 0.0), (ids[2], ids[3], 0.0)]
    packed, padded = pack_pairs(pairs, tok.pad_token_id), collate_pairs(pairs, tok.pad_token_id)
    with torch.no_grad():
        a = module.forward_packed(packed["input_ids"], packed["position_ids"], packed["lengths"])
        b = module(padded["input_ids"], padded["attention_mask"])
        alone = torch.stack([module(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long))[0]
                             for row in (ids[0], ids[2], ids[1], ids[3])])
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, alone, atol=1e-5, rtol=1e-5)  # padding (pad = EOS too) changes nothing


@pytest.mark.parametrize("setup", SETUPS)
def test_ppo_rollouts_left_pad_and_start_on_policy(setup, tokenizer_dirs):
    lm = ModelConfig(arch=TINY_LLAMA, tokenizer=tokenizer_dirs[setup],
                     lora=LoraSettings(r=4, alpha=8, target_modules="all-linear"))
    module = PPOModule(lm, LetterReward(), ppo=PPOConfig(mini_batch_size=4, ppo_epochs=1),
                       sampling=SamplingConfig(min_new_tokens=2, max_new_tokens=6), rollout_batch_size=4)
    module.configure_model()
    batch = make_batch(module, 4)
    tok = module.tokenizer
    mask = batch["attention_mask"]
    assert (mask[:, -1] == 1).all() and (mask.sum(-1) < mask.size(1)).any()  # left-padded, ragged
    if setup == "bos_no_pad":  # every prompt's first real token is BOS
        first = mask.argmax(-1)
        assert (batch["input_ids"][torch.arange(4), first] == tok.bos_token_id).all()
    rollout = module.rollout(batch, module.generator)
    module.policy.train()
    # The module's own layout (packed on ragged responses), as in its update: exactly on policy.
    assert torch.equal(evaluate_actions(module.policy, rollout, packed=module.update_config.packed)[0], rollout.logprobs)
    assert torch.equal(rollout.logprobs, rollout.ref_logprobs)
    responses = decode_responses(tok, rollout)
    assert all(tok.eos_token not in r and tok.pad_token not in r for r in responses)


def test_decode_reads_only_the_masked_in_tokens():
    # A vocabulary whose id 0 is an ordinary token, as "!" is in GPT-2's.
    vocab = {"!": 0, "good": 1, "bad": 2, "<eos>": 3}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="!"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    rollout = Rollout(query_ids=torch.ones(2, 1, dtype=torch.long), query_mask=torch.ones(2, 1, dtype=torch.long),
                      response_ids=torch.tensor([[1, 2, 3, 3], [2, 3, 3, 3]]),
                      response_mask=torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]))
    assert decode_responses(tok, rollout) == ["good bad", "bad"]
