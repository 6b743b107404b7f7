"""Causal ViT: incremental decoding with the KV cache equals the full causal forward.

The full forward runs the attention API with causal=True over all tokens; the incremental path
writes keys into the preallocated cache and runs decode_attention (or, for chunks of more
than 16 tokens, causal attention over the cached prefix). Same float32 weights and inputs, so
only the summation order differs: tolerance 1e-5.
"""
import pytest
import torch

from distvit.models.causal_vit import KVCache, vit_causal_base_patch16_224, vit_causal_digits

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return vit_causal_digits().eval()


def _images(model, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    return torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)


@torch.no_grad()
def test_token_by_token_decoding_equals_full_forward(model):
    images = _images(model)
    full = model(images)
    patches = model.patchify(images)
    cache = model.new_cache(batch=2)
    steps = [model.step(None, cache)]
    for i in range(model.num_patches - 1):
        steps.append(model.step(patches[:, i:i + 1], cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **TOL)
    assert cache.seqlens.tolist() == [model.num_patches] * 2


@torch.no_grad()
def test_chunks_of_several_tokens_equal_full_forward(model):
    # Tq = 5 and Tq = 10: decode_attention's bottom-right causal convention inside a chunk.
    images = _images(model)
    full = model(images)
    patches = model.patchify(images)
    cache = model.new_cache(batch=2)
    out = [model.step(None, cache), model.step(patches[:, :5], cache), model.step(patches[:, 5:15], cache)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)


@torch.no_grad()
def test_long_prefill_then_decode_equals_full_forward():
    # 64 patches: a 40-token prefill (more than decode takes) then one token at a time.
    torch.manual_seed(0)
    model = vit_causal_digits(img_size=16).eval()
    images = _images(model)
    full = model(images)
    patches = model.patchify(images)
    cache = model.new_cache(batch=2)
    out = [model.step(None, cache), model.step(patches[:, :40], cache)]
    out += [model.step(patches[:, i:i + 1], cache) for i in range(40, 63)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)


@torch.no_grad()
def test_generate_feeds_its_own_predictions_back(model):
    # Greedy generation is the full forward applied to its own output: re-running the model on
    # the generated image predicts each patch as the generated one (teacher forcing = sampling).
    prompt = model.patchify(_images(model))[:, :6]
    images = model.generate(batch=2, prompt=prompt)
    assert images.shape == (2, 1, 8, 8)
    patches = model.patchify(images)
    torch.testing.assert_close(patches[:, :6], prompt, rtol=0, atol=0)
    torch.testing.assert_close(model(images)[:, 6:], patches[:, 6:], **TOL)


def test_kv_cache_writes_each_sequence_after_its_own_tokens():
    cache = KVCache(num_layers=2, batch=3, heads=2, capacity=8, head_dim=4)
    cache.seqlens.copy_(torch.tensor([0, 3, 5]))
    k = torch.arange(3 * 2 * 2 * 4, dtype=torch.float32).reshape(3, 2, 2, 4)
    cache.write(1, k, -k)
    for b, start in enumerate([0, 3, 5]):
        torch.testing.assert_close(cache.k[1, b, :, start:start + 2], k[b], rtol=0, atol=0)
        torch.testing.assert_close(cache.v[1, b, :, start:start + 2], -k[b], rtol=0, atol=0)
        assert cache.k[1, b].abs().sum() == k[b].abs().sum()  # nothing written elsewhere
    assert cache.k[0].abs().sum() == 0
    cache.advance(2)
    assert cache.seqlens.tolist() == [2, 5, 7]


@torch.no_grad()
def test_ragged_cache_decodes_each_sequence_at_its_own_length(model):
    # Through the attention layer directly: sequences at different lengths in one batch.
    torch.manual_seed(3)
    attn = model.blocks[0].attn
    x = torch.randn(2, 6, model.cfg.embed_dim)
    full = attn(x)  # causal over all 6 tokens
    cache = model.new_cache(batch=2)
    attn(x[:, :4], cache, 0)
    cache.advance(4)
    cache.seqlens[1] = 2  # sequence 1 forgets tokens 2, 3: its next token is token 2 again
    step = attn(torch.stack([x[0, 4:5], x[1, 2:3]]), cache, 0)
    torch.testing.assert_close(step[0], full[0, 4:5], **TOL)
    torch.testing.assert_close(step[1], full[1, 2:3], **TOL)


def test_step_errors_say_what_to_do(model):
    cache = model.new_cache(batch=1)
    patch = torch.zeros(1, 1, model.patch_dim)
    with pytest.raises(ValueError) as err:
        model.step(patch, cache)
    assert str(err.value) == ("CausalViT.step: the cache is empty, so the start token comes first: call "
                              "step(None, cache) before feeding patches")
    model.step(None, cache)
    with pytest.raises(ValueError) as err:
        model.step(None, cache)
    assert str(err.value) == ("CausalViT.step: the start token goes first, but the cache already holds 1 tokens; "
                              "call cache.reset() to begin a new image")
    with pytest.raises(ValueError) as err:
        model.step(torch.zeros(1, 16, model.patch_dim), cache)
    assert str(err.value) == ("CausalViT.step: the cache holds 1 tokens and 16 more do not fit in 16 positions "
                              "(one per patch)")


@torch.no_grad()
def test_base_geometry_decodes_like_its_full_forward():
    # ViT-B width, heads and 196 tokens, two blocks to stay fast; the full model's size below.
    torch.manual_seed(0)
    model = vit_causal_base_patch16_224(depth=2).eval()
    images = torch.randn(1, 3, 224, 224)
    full = model(images)
    patches = model.patchify(images)
    cache = model.new_cache(batch=1)
    out = [model.step(None, cache), model.step(patches[:, :180], cache)]
    out += [model.step(patches[:, i:i + 1], cache) for i in range(180, 195)]
    torch.testing.assert_close(torch.cat(out, dim=1), full, **TOL)
    assert full.shape == (1, 196, 768)


def test_base_model_size():
    with torch.device("meta"):  # shapes only: no memory, no init time
        n = sum(p.numel() for p in vit_causal_base_patch16_224().parameters())
    d, hidden = 768, 3072
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * hidden + hidden) + (hidden * d + d) + 4 * d
    embed_and_head = 2 * (d * d + d)  # 16 x 16 x 3 = 768 pixels per patch, in and out
    assert n == 12 * block + embed_and_head + 196 * d + d + 2 * d  # + positions, start token, final norm


def test_registered_under_its_names():
    from distvit.models import create, list_models  # the package import registers them

    assert list_models("vit_causal_*") == ["vit_causal_base_patch16_224", "vit_causal_digits"]
    model = create("vit_causal_digits", depth=2, img_size=None)  # None keeps the default
    assert len(model.blocks) == 2 and model.cfg.img_size == 8
    with pytest.raises(ValueError) as err:
        create("vit_causal_digits", num_classes=10)
    assert str(err.value) == (
        "vit_causal_digits: unknown override(s) num_classes; a causal ViT takes attn_backend, depth, drop_path_rate, "
        "embed_dim, img_size, in_chans, mlp_ratio, num_heads, patch_size, prefix_patches, qkv_bias (it has no "
        "classifier, so no num_classes)")


def test_loss_trains_every_parameter(model):
    model.train()
    images = _images(model)
    loss = model.loss(images)
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.01 * p.grad  # one small SGD step
    assert model.loss(images) < loss


# --- generation with the cache equals generation that recomputes the full causal forward (issue 19, item 3)


def _recompute_next(model, patches: torch.Tensor) -> torch.Tensor:
    """The next patch of one or more sequences of k patches (B, k, patch_dim): a full causal forward
    over the start token and all k patches, no cache; the prediction at the last token."""
    tokens = torch.cat([model.start_token.expand(patches.shape[0], -1, -1), model.patch_embed(patches)], dim=1)
    return model.forward_tokens(tokens + model.pos_embed[:, :tokens.shape[1]])[:, -1]


@torch.no_grad()
def test_cached_generation_equals_recomputing_the_full_forward_each_step(model):
    prompt = model.patchify(_images(model))[:, :5]
    cached = model.patchify(model.generate(batch=2, prompt=prompt))
    out = prompt
    while out.shape[1] < model.num_patches:
        out = torch.cat([out, _recompute_next(model, out)[:, None]], dim=1)
    torch.testing.assert_close(cached, out, **TOL)
    assert not torch.allclose(out[:, 5:], model.patchify(_images(model))[:, 5:])  # it generated, not copied


@torch.no_grad()
def test_ragged_cached_generation_equals_recomputing_each_sequence(model):
    # Prompts of 3 and 7 patches in one batch: one lockstep prefill of 7, then sequence 0's cache
    # length is cut back to its own 1 + 3 tokens, and every decoding step writes each sequence's
    # new token at its own position (cache.seqlens) with its own position embedding.
    lengths, new = [3, 7], 8
    patches = model.patchify(_images(model))
    cache = model.new_cache(batch=2)
    model.step(None, cache)
    prefill = model.step(patches[:, :max(lengths)], cache)
    cache.seqlens.copy_(torch.tensor([1 + k for k in lengths]))
    pred = torch.stack([prefill[b, k - 1] for b, k in enumerate(lengths)])
    generated = [pred]
    for _ in range(new - 1):
        pos = cache.seqlens.long()
        tokens = model.patch_embed(pred[:, None]) + model.pos_embed[0, pos][:, None]
        pred = model.forward_tokens(tokens, cache)[:, -1]
        generated.append(pred)
    assert cache.seqlens.tolist() == [1 + k + new - 1 for k in lengths]
    generated = torch.stack(generated, dim=1)
    for b, k in enumerate(lengths):
        seq = patches[b:b + 1, :k]
        for _ in range(new):
            seq = torch.cat([seq, _recompute_next(model, seq)[:, None]], dim=1)
        torch.testing.assert_close(generated[b], seq[0, k:], **TOL, msg=lambda m: f"sequence {b}: {m}")
