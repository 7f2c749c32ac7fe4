"""A tiny CPU config shared by the tests: seconds, not minutes."""

TINY = [
    "model.backbone.embed_dim=32",
    "model.backbone.depth=2",
    "model.backbone.num_heads=2",
    "model.backbone.patch_size=8",
    "model.conv_dim=32",
    "model.mask_dim=32",
    "model.hidden_dim=32",
    "model.nheads=2",
    "model.num_queries=6",
    "model.dec_layers=3",
    "model.dim_feedforward=64",
    "loss.num_points=256",
    "adapt.disc.hidden=32",
    "data.crop_size=[64,64]",
    "data.batch_size=2",
]
