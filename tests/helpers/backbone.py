"""Tiny VideoMAEv2 configurations, random weights in which every one matters, and random clips:
for the backbone's equality tests and the GPU path's precision tests."""
import torch

TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=0, embed_dim=64, depth=3,
            num_heads=4, mlp_ratio=4.0, qkv_bias=True, init_values=0.0, all_frames=16,
            tubelet_size=2, use_mean_pooling=True)


def random_state(model, seed=0):
    """Every weight random (norm scales and layer scales around 1) so each one matters; matrices
    small enough to keep activations near unit scale, as in trained models."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in model.state_dict().items():
        noise = (0.2 if value.ndim == 1 else 0.05) * torch.randn(value.shape, generator=gen)
        scale_like = name.endswith("norm1.weight") or name.endswith("norm2.weight") or \
            name.endswith("norm.weight") or ".gamma_" in name
        state[name] = noise + 1.0 if scale_like else noise
    return state


def clips(frames, height, width, batch=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=gen)
