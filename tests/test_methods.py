import pytest
import torch

from tmtseg.adapt.base import StepPasses
from tmtseg.adapt.build import build_model_with_loss
from tmtseg.adapt.registry import METHODS
from tmtseg.config import load_config

from .tiny import TINY


def _batch(seed, b=2, h=64, w=64, k=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (b, 3, h, w), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, k, (b, h, w), generator=g),
    }


def test_tmt_with_lambda_zero_predicts_exactly_as_vanilla():
    torch.manual_seed(0)
    tmt = build_model_with_loss(load_config([], [*TINY, "adapt.method=tmt"])).eval()
    vanilla = build_model_with_loss(load_config([], TINY)).eval()
    vanilla.model.load_state_dict(tmt.model.state_dict())
    images = _batch(1)["image"]
    with torch.no_grad():
        a = tmt.model(images, hooks=tmt.method.inference_hooks())
        b = vanilla.model(images, hooks=vanilla.method.inference_hooks())
    torch.testing.assert_close(a["pred_logits"], b["pred_logits"], rtol=0, atol=0)
    torch.testing.assert_close(a["pred_masks"], b["pred_masks"], rtol=0, atol=0)
    with torch.no_grad():
        tmt.method.tma.lambdas.fill_(1.0)  # and TMA is not a no-op once lambda moves
        c = tmt.model(images, hooks=tmt.method.inference_hooks())
    assert not torch.allclose(c["pred_masks"], b["pred_masks"])


@pytest.mark.parametrize("at_inference", [True, False])
@pytest.mark.parametrize("method", ["tmt", "tvt", "dann"])
def test_inference_runs_the_attention_pieces_that_ask_and_the_alignment_they_read(method, at_inference):
    trainer = build_model_with_loss(
        load_config([], [*TINY, f"adapt.method={method}", f"adapt.tma.at_inference={at_inference}"])
    )
    hooks = trainer.method.inference_hooks()
    attention = [type(p).__name__ for p in hooks.attention] if hooks else []
    align = [type(p).__name__ for p in hooks.align] if hooks else []
    expected = {  # TVT's attention term always runs; TMA as adapt.tma.at_inference says; DANN changes no prediction
        "tmt": (["TMAAttention"], ["RegionAlignment"]) if at_inference else ([], []),
        "tvt": (["PatchAttention"], ["PatchAlignment"]),
        "dann": ([], []),
    }[method]
    assert (attention, align) == expected
    training = trainer.method.hooks(grl=torch.tensor(1.0))  # in training every piece runs
    assert len(training.align) == len(METHODS[method].align) and len(training.attention) == len(
        METHODS[method].attention
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_every_parameter(method):
    torch.manual_seed(0)
    trainer = _with_teacher([f"adapt.method={method}", "adapt.tma.lambda_init=0.5"])
    losses = trainer({"labelled": _batch(1), "unlabelled": _batch(2)}, step=5)
    assert torch.isfinite(losses["loss"])
    assert ("loss_adv" in losses) == bool(METHODS[method].align)
    assert ("loss_preserve" in losses) == (method in ("tmt", "lwf"))  # TMT's default: the KL on; LwF is the KL
    assert ("loss_l2sp" in losses) == (method == "l2sp")
    losses["loss"].backward()
    no_grad = [n for n, p in trainer.named_parameters() if p.requires_grad and (p.grad is None)]
    # msdeform is not used here; the class-token positional entry only feeds the class token, which the decoder
    # never reads: every other parameter must be trained
    assert [n for n in no_grad if "cls_token" not in n and "pos_embed" not in n] == []
    frozen = [n for n, p in trainer.named_parameters() if not p.requires_grad]
    vit = [n for n, _ in trainer.model.backbone.vit.named_parameters()]
    assert frozen == ([f"model.backbone.vit.{n}" for n in vit] if method in ("lora", "frozen") else [])


def test_unsupervised_variant_never_reads_target_labels():
    torch.manual_seed(0)
    trainer = _with_teacher(["adapt.method=tmt", "adapt.unsupervised=true"])
    trainer.eval()  # no dropout: the two calls must see the same computation
    target, source = _batch(1), _batch(2)
    torch.manual_seed(0)  # the criterion samples random points
    a = trainer({"labelled": source, "unlabelled": target}, step=3)["loss"]
    target["label"] = torch.full_like(target["label"], 255)
    torch.manual_seed(0)
    b = trainer({"labelled": source, "unlabelled": target}, step=3)["loss"]
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_grl_pushes_features_against_the_discriminator():
    """With the GRL the backbone gradient of the adversarial term points opposite to the discriminator's own."""
    torch.manual_seed(0)
    trainer = build_model_with_loss(load_config([], [*TINY, "adapt.method=dann", "adapt.adv_weight=1.0"])).eval()
    method = trainer.method  # eval: the discriminator's dropout would make the two passes differ
    disc = method.align[0]
    grads = []
    for grl in (1.0, -1.0):  # a negative coefficient undoes the reversal
        trainer.zero_grad()
        feats_t = trainer.model.encode(_batch(1)["image"], hooks=method.hooks(grl=grl))
        feats_s = trainer.model.encode(_batch(2)["image"], hooks=method.hooks(grl=grl))
        feats_t["tokens"].retain_grad()
        disc.loss(feats_t["adapt"], feats_s["adapt"], labelled_is_source=False).backward()
        grads.append(feats_t["tokens"].grad.clone())
    torch.testing.assert_close(grads[0], -grads[1])


def test_optimizer_gives_lambda_and_discriminators_their_own_lr():
    from tmtseg.engine.optim import build_optimizer

    cfg = load_config([], [*TINY, "adapt.method=tmt", "train.lr=1e-4", "train.backbone_lr_mult=0.5",
                           "adapt.head_lr_mult=10", "adapt.tma.lambda_lr_mult=100"])  # fmt: skip
    trainer = build_model_with_loss(cfg)
    opt = build_optimizer(cfg, trainer)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    named = dict(trainer.named_parameters())
    assert lr_of[id(named["method.tma.lambdas"])] == pytest.approx(1e-2) and wd_of[id(named["method.tma.lambdas"])] == 0
    disc = [n for n in named if n.startswith("method.acte.discriminator.") and n.endswith("weight")]
    assert disc and all(lr_of[id(named[n])] == pytest.approx(1e-3) for n in disc)
    assert all(lr_of[id(p)] == pytest.approx(5e-5) for n, p in named.items() if n.startswith("model.backbone.vit."))
    fresh = ("model.decoder.", "model.backbone.pyramid.")  # the pyramid starts fresh on a pretrained ViT: lr x 1
    assert all(lr_of[id(p)] == pytest.approx(1e-4) for n, p in named.items() if n.startswith(fresh))
    assert len(lr_of) == len(named)  # every parameter is optimised, once


def test_tmt_loss_weight_reweights_the_mask_losses_only():
    torch.manual_seed(0)
    trainer = _with_teacher(["adapt.method=tmt", "adapt.tma.loss_weight=2.0"])
    batch = _batch(1)
    outputs = trainer.model(batch["image"], hooks=trainer.method.hooks(grl=0.5))
    weight = trainer.method.point_weight(outputs)
    assert weight.shape == (2, 1, *outputs["pred_masks"].shape[-2:])  # on the prediction grid
    assert weight.min() >= 1.0 and weight.max() <= 3.0  # 1 + beta * W, W in [0, 1]
    assert build_model_with_loss(load_config([], [*TINY, "adapt.method=tmt"])).method.point_weight(outputs) is None

    # the weights reach the criterion: a map that zeroes half of the image changes the mask losses, not the class loss
    half = torch.ones_like(weight)
    half[..., : half.shape[-1] // 2] = 0.0
    out = {}
    for name, fn in (("plain", lambda o: None), ("half", lambda o: half)):
        trainer.method.point_weight = fn
        torch.manual_seed(1)
        out[name] = trainer({"labelled": batch, "unlabelled": _batch(2)}, step=3)
    torch.testing.assert_close(out["half"]["loss_ce"], out["plain"]["loss_ce"])
    assert not torch.allclose(out["half"]["loss_mask"], out["plain"]["loss_mask"])


def _with_teacher(overrides):
    """A trainer and a frozen copy of its segmenter as the source model (as the runner attaches one)."""
    import copy

    torch.manual_seed(0)
    trainer = build_model_with_loss(load_config([], [*TINY, *overrides]))
    trainer.method.set_teacher(copy.deepcopy(trainer.model))
    return trainer


@pytest.mark.parametrize("images", ["source", "target", "both"])
def test_preserve_is_zero_at_the_source_model_and_grows_as_the_model_moves(images):
    trainer = _with_teacher(["adapt.method=tmt", "adapt.preserve.weight=1.0", f"adapt.preserve.images={images}"])
    batches = {"labelled": _batch(1), "unlabelled": _batch(2)}
    losses = trainer(batches, step=3)
    assert losses["loss_preserve"].item() == pytest.approx(0.0, abs=1e-5)  # the adapted model is still the source
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
    losses = trainer(batches, step=3)
    assert losses["loss_preserve"].item() > 1e-3
    losses["loss"].backward()
    assert trainer.model.decoder.class_embed.bias.grad is not None
    # the teacher is no part of the trainer: never optimised, never in a checkpoint
    assert not any("teacher" in k for k in trainer.state_dict())
    assert all(p.grad is None for p in trainer.method.regularisers["preserve"]._teacher[0].parameters())


@pytest.mark.parametrize("method, shared", [("lwf", True), ("tmt", True), ("tvt", False), ("lora", False)])
def test_the_source_model_takes_the_adapted_models_vit_tokens_only_where_its_vit_computes_the_same(method, shared):
    """The KL's teacher skips its own ViT when the student's is the same frozen ViT (a third of a KL method's step),
    and the loss is bit for bit the one it computes itself; never under TVT's attention bias or LoRA's hooks."""
    trainer = _with_teacher([f"adapt.method={method}", f"adapt.preserve.methods=[{method}]", "adapt.preserve.weight=1"])
    trainer.model.backbone.vit.requires_grad_(False)  # as train.freeze_blocks=-1 leaves it (LoRA freezes it itself)
    kl, teacher = trainer.method.regularisers["preserve"], trainer.method.regularisers["preserve"]._teacher[0]
    calls = []
    teacher.backbone.vit.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
    images = _batch(1)["image"]
    with torch.no_grad():
        outputs = trainer.model(images, hooks=trainer.method.hooks(grl=torch.tensor(0.5)))
        reused = kl.term(images, outputs, None, student=trainer.model)
        assert len(calls) == (0 if shared else 1)
        own = kl.term(images, outputs, None)  # no student: the teacher runs its own ViT
    assert reused.item() > 1e-4 and torch.equal(reused, own)
    before = len(calls)
    losses = trainer({"labelled": _batch(1), "unlabelled": _batch(2)}, step=3)  # and inside a training step
    assert (len(calls) == before) == shared and losses["loss_preserve"].item() > 1e-4
    if shared:  # a student ViT weight that moved (a version bump) is compared again, and no longer shared
        with torch.no_grad():
            trainer.model.backbone.vit.norm.weight.mul_(1.01)
        kl.term(images, outputs, None, student=trainer.model)
        assert len(calls) == 2


def test_the_source_model_runs_its_own_vit_under_stochastic_depth_in_training():
    trainer = _with_teacher(["adapt.method=lwf", "model.backbone.drop_path=0.1"])
    trainer.model.backbone.vit.requires_grad_(False)
    kl = trainer.method.regularisers["preserve"]
    assert not kl.shares_vit(trainer.model.train())
    assert kl.shares_vit(trainer.model.eval())


def test_finetune_with_preserve_on_source_images_reads_the_source_batch():
    plain = build_model_with_loss(load_config([], [*TINY, "adapt.method=finetune"]))
    assert not plain.method.needs_unlabelled and not plain.method.wants_teacher
    trainer = _with_teacher(["adapt.method=finetune", "adapt.preserve.weight=1.0", "adapt.preserve.methods=[finetune]"])
    assert trainer.method.needs_unlabelled and trainer.method.transferability({}, (4, 4)) is None  # uniform weights
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(1.0)
    a = trainer({"labelled": _batch(1), "unlabelled": _batch(2)}, step=3)["loss_preserve"]
    b = trainer({"labelled": _batch(1), "unlabelled": _batch(3)}, step=3)["loss_preserve"]
    assert a.item() != pytest.approx(b.item())  # computed on the source batch


def test_preserve_counts_each_pixel_by_its_transferability():
    trainer = _with_teacher(["adapt.method=tmt", "adapt.preserve.weight=1.0", "adapt.preserve.images=target"])
    method, kl = trainer.method, trainer.method.regularisers["preserve"]
    batch = _batch(1)
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
        outputs = trainer.model(batch["image"], hooks=method.hooks(grl=0.5))
        hw = outputs["pred_masks"].shape[-2:]
        t = method.transferability(outputs["adapt"], hw)
        assert t.shape == (2, 1, *hw) and 0 <= t.min() and t.max() <= 1
        # model=None: no student ViT to share, the teacher runs its own (as the loss did before StepPasses)
        weighted = kl.loss(StepPasses(model=None, method=method, passes={"target": (batch["image"], outputs)}))
        uniform = kl.term(batch["image"], outputs, None)
        right = torch.zeros(2, 1, *hw)
        right[..., right.shape[-1] // 2 :] = 1.0
        half = kl.term(batch["image"], outputs, right)
    assert weighted.item() == pytest.approx(kl.term(batch["image"], outputs, t).item())  # weight 1: the term itself
    assert uniform.item() > 0 and weighted.item() > 0
    assert half.item() != pytest.approx(uniform.item())  # only the right half counts


def _steps(trainer, cfg, n=3):
    from tmtseg.engine.optim import build_optimizer

    opt = build_optimizer(cfg, trainer)
    for step in range(n):
        opt.zero_grad()
        trainer({"labelled": _batch(1 + step), "unlabelled": _batch(9)}, step=step)["loss"].backward()
        opt.step()


def test_lora_trains_only_the_low_rank_factors_and_the_decoders():
    cfg = load_config([], [*TINY, "adapt.method=lora", "adapt.lora.targets=[qkv,fc2]"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    factors = sorted(n for n, _ in trainer.named_parameters() if n.startswith("method.lora."))
    assert factors == [f"method.lora.{ab}.blocks_{i}_{layer}" for ab in "ab" for i in (0, 1)
                       for layer in ("attn_qkv", "mlp_fc2")]  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.named_parameters()}
    _steps(trainer, cfg)
    after = dict(trainer.named_parameters())
    for name, old in before.items():
        if name.startswith("model.backbone.vit."):
            assert torch.equal(after[name], old), name  # bit-identical
    moved = {n.split(".")[1] for n, old in before.items() if not torch.equal(after[n], old)}
    assert moved == {"lora", "backbone", "pixel_decoder", "decoder"}  # backbone: its feature pyramid only
    assert not torch.equal(after["method.lora.b.blocks_1_attn_qkv"], before["method.lora.b.blocks_1_attn_qkv"])


def test_acte_on_the_vit_tokens_maps_the_stride_16_grid_and_trains():
    cfg = load_config(
        [], [*TINY, "adapt.method=tmt", "adapt.preserve.weight=0", "adapt.acte.features=vit", "adapt.acte.cell=2"]
    )
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    assert trainer.method.acte.discriminator.net.layers[0].in_features == cfg.model.backbone.embed_dim
    out = trainer.model(_batch(3)["image"], hooks=trainer.method.hooks(grl=torch.tensor(1.0)))
    # TINY's tokens are one per 8 px: resampled to the stride-16 grid of the decoder's 1/16 map
    assert tuple(out["features"]["tokens_hw"]) == (8, 8)
    assert tuple(out["adapt"]["acte"]["tmap"].shape[-2:]) == (64 // 16, 64 // 16)
    before = trainer.method.acte.discriminator.net.layers[0].weight.detach().clone()
    _steps(trainer, cfg, n=2)
    assert not torch.equal(before, trainer.method.acte.discriminator.net.layers[0].weight)


def test_lora_given_to_another_method_keeps_its_pieces_and_freezes_the_vit():
    cfg = load_config([], [*TINY, "adapt.method=tmt", "adapt.lora.methods=[tmt]"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    names = [n for n, p in trainer.named_parameters() if p.requires_grad]
    assert any(n.startswith("method.lora.") for n in names) and any(n.startswith("method.acte.") for n in names)
    assert "method.tma.lambdas" in names and not any(n.startswith("model.backbone.vit.") for n in names)
    plain = build_model_with_loss(load_config([], [*TINY, "adapt.method=tmt"]))
    assert not any(n.startswith("method.lora.") for n, _ in plain.named_parameters())


def test_lora_checkpoint_loads_into_the_plain_segmenter_and_resumes_exactly(tmp_path):
    from tmtseg.engine.restore import load_segmenter
    from tmtseg.io.checkpoint import load_checkpoint, load_weights, save_checkpoint
    from tmtseg.modeling.build import build_model

    cfg = load_config([], [*TINY, "adapt.method=lora"])
    torch.manual_seed(0)
    trainer = build_model_with_loss(cfg)
    _steps(trainer, cfg)
    trainer.eval()
    path = save_checkpoint(tmp_path, step=3, model=trainer, meta={})
    plain = build_model(cfg).eval()
    load_segmenter(plain, str(path))  # the segmenter weights only: the update merged in
    x = _batch(5)["image"]
    with torch.no_grad():
        a, b = trainer.model(x, hooks=trainer.method.inference_hooks()), plain(x)
    torch.testing.assert_close(b["pred_masks"], a["pred_masks"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(b["pred_logits"], a["pred_logits"], rtol=1e-4, atol=1e-4)
    qkv = "model.backbone.vit.blocks.0.attn.qkv.weight"
    assert not torch.equal(plain.state_dict()[qkv[len("model.") :]], trainer.model.state_dict()[qkv[len("model.") :]])

    torch.manual_seed(1)
    resumed = build_model_with_loss(cfg)  # as a resume does: a fresh trainer, then the checkpoint's weights
    load_weights(resumed, load_checkpoint(path).weights, source=str(path))
    for (name, p), q in zip(trainer.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name  # the frozen weights too: exact, not merged-then-unmerged


def test_l2sp_is_zero_at_the_source_weights_and_grows_as_they_move():
    trainer = _with_teacher(["adapt.method=l2sp", "adapt.l2sp.alpha=0.5"])
    batches = {"labelled": _batch(1), "unlabelled": _batch(2)}
    assert trainer(batches, step=3)["loss_l2sp"].item() == 0.0
    bias = trainer.model.decoder.class_embed.bias
    with torch.no_grad():
        bias.add_(0.1)
    small = trainer(batches, step=3)["loss_l2sp"]
    assert small.item() == pytest.approx(0.5 / 2 * 0.01 * bias.numel(), rel=1e-4)  # alpha/2 * |dw|^2
    with torch.no_grad():
        bias.add_(0.1)
    large = trainer(batches, step=3)
    assert large["loss_l2sp"].item() == pytest.approx(4 * small.item(), rel=1e-4)
    large["loss"].backward()
    assert trainer.model.backbone.vit.blocks[0].attn.qkv.weight.grad is not None


def test_l2sp_given_to_another_method_pulls_its_new_weights_to_zero():
    trainer = _with_teacher(["adapt.method=dann", "adapt.l2sp.methods=[dann]", "adapt.l2sp.beta=1.0"])
    loss = trainer({"labelled": _batch(1), "unlabelled": _batch(2)}, step=3)["loss_l2sp"]
    new = sum((p**2).sum() for p in trainer.method.parameters())  # the segmenter is still the source: beta only
    assert loss.item() == pytest.approx(0.5 * new.item(), rel=1e-5)


def test_lwf_is_the_uniform_kl_and_zero_at_the_source_model():
    trainer = _with_teacher(["adapt.method=lwf", "adapt.preserve.images=target"])
    batches = {"labelled": _batch(1), "unlabelled": _batch(2)}
    assert not trainer.method.needs_unlabelled  # the KL on the labelled batch only
    assert trainer(batches, step=3)["loss_preserve"].item() == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        trainer.model.decoder.class_embed.bias.add_(torch.randn_like(trainer.model.decoder.class_embed.bias))
    assert trainer(batches, step=3)["loss_preserve"].item() > 1e-3
    # lwf is fine-tuning with the KL: the same numbers as finetune listed in adapt.preserve.methods
    control = _with_teacher(
        ["adapt.method=finetune", "adapt.preserve.methods=[finetune]", "adapt.preserve.images=target"]
    )
    control.load_state_dict(trainer.state_dict())
    torch.manual_seed(0)
    a = trainer(batches, step=3)
    torch.manual_seed(0)
    b = control(batches, step=3)
    assert a["loss"].item() == b["loss"].item()


def test_the_method_table_is_what_cli_config_and_bench_accept():
    from tmtseg import cli
    from tmtseg.adapt.registry import METHOD_ALIASES
    from tmtseg.adapt.registry import METHODS as TABLE
    from tmtseg.errors import ConfigError
    from tmtseg.tools import bench

    assert TABLE is METHODS and bench.ADAPT_METHODS == tuple(METHODS)
    adapt = next(a for a in cli._parser()._subparsers._group_actions[0].choices["adapt"]._actions
                 if "--method" in a.option_strings)  # fmt: skip
    assert tuple(adapt.choices) == (*METHODS, *METHOD_ALIASES)  # the table's names, then its aliases (recommended)
    for name in METHODS:
        assert load_config([], [f"adapt.method={name}", f"adapt.preserve.methods=[{name}]"]).adapt.method == name
    for bad in ("adapt.method=coral", "adapt.preserve.methods=[coral]", "adapt.l2sp.methods=[coral]",
                "adapt.l2sp.alpha=-1", "adapt.lora.targets=[norm1]", "adapt.lora.rank=0"):  # fmt: skip
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config([], [bad])


def test_lora_resume_is_bitwise_exact(tmp_path):
    import shutil

    from safetensors.torch import load_file

    from tmtseg.engine.loop import fit
    from tmtseg.io.checkpoint import MODEL_FILE

    run = [*TINY, "adapt.method=lora", "data.train.num_images=4", "data.val.num_images=1", "train.iters=4",
           "train.warmup_iters=1", "train.save_every=2", "train.log_every=1"]  # fmt: skip
    fit(load_config([], [*run, f"output_dir={tmp_path / 'a'}"]), progress=False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "iter_0000004")  # as if killed after the save of step 2
    fit(load_config([], [*run, f"output_dir={tmp_path / 'b'}"]), resume=True, progress=False)
    a, b = (load_file(tmp_path / r / "checkpoints" / "iter_0000004" / MODEL_FILE) for r in "ab")
    assert a.keys() == b.keys() and any(k.startswith("method.lora.base.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["lora", "frozen"])
def test_ddp_wraps_a_method_with_frozen_weights(tmp_path, method):
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        trainer = build_model_with_loss(load_config([], [*TINY, f"adapt.method={method}"]))
        ddp = torch.nn.parallel.DistributedDataParallel(trainer)
        for step in range(2):  # DDP raises in the next step if a parameter it reduces got no gradient
            ddp({"labelled": _batch(1 + step)}, step=step)["loss"].backward()
        assert all(p.grad is None for p in trainer.model.backbone.vit.parameters())
        assert all(p.grad is not None for p in trainer.model.decoder.parameters())
    finally:
        torch_dist.destroy_process_group()
