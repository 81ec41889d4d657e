"""Data and weights as a user brings them: image folders with real files, shapes, local checkpoints."""

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from attnreg_lightning.data.folder import ImageFolderDataModule
from attnreg_lightning.data.shapes import PALETTE, ShapesDataset, ShapesSpec, render
from attnreg_lightning.models import ViTClassifier, create_vit


def write_image_tree(root: Path, size: int = 40, per_class: int = 3) -> Path:
    """train/ and val/ with two classes, PNG and JPEG files, and PNG masks for val."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("cat", "dog")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
                pixels[10:20, 10:20] = (255 * c, 0, 255 * (1 - c))
                ext = "png" if i % 2 == 0 else "jpg"
                Image.fromarray(pixels).save(folder / f"img{i}.{ext}")
                if split == "val":
                    mask = np.zeros((size, size), np.uint8)
                    mask[10:20, 10:20] = 255
                    (root / "masks" / split / name).mkdir(parents=True, exist_ok=True)
                    Image.fromarray(mask).save(root / "masks" / split / name / f"img{i}.png")
    return root


def test_image_folder_reads_files_masks_and_model_normalization(tmp_path):
    root = write_image_tree(tmp_path)
    dm = ImageFolderDataModule(str(root), num_classes=2, model_name="vit_tiny_patch16_224", image_size=32, batch_size=6)
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape == (6, 3, 32, 32)
    assert batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    assert batch["mask"].shape == (6, 32, 32) and set(batch["mask"].unique().tolist()) == {0.0, 1.0}
    # masks resized alike: the 10..20 square of a 40 px image lands at 8..16 of 32 px
    assert batch["mask"][0, 8:16, 8:16].all() and batch["mask"][0, :7].sum() == 0
    assert batch["id"].tolist() == [10_000_000 + i for i in range(6)]
    # vit_tiny's pretrained config normalizes with mean = std = 0.5: pixels land in [-1, 1]
    assert batch["image"].min() >= -1 - 1e-6 and batch["image"].max() <= 1 + 1e-6
    train = next(iter(dm.train_dataloader()))
    assert "mask" not in train  # no masks for train in this tree


def test_image_folder_errors_name_the_key(tmp_path):
    root = write_image_tree(tmp_path)
    with pytest.raises(ValueError, match="data.root"):
        ImageFolderDataModule(str(tmp_path / "nowhere"), 2, "vit_tiny_patch16_224")
    dm = ImageFolderDataModule(str(root), 5, "vit_tiny_patch16_224")
    with pytest.raises(ValueError, match="data.num_classes=5"):
        dm.setup()


def test_shapes_are_deterministic_and_label_carried_by_colour():
    spec = ShapesSpec(image_size=64, noise_squares=2)
    a, b = render(spec, 5), render(spec, 5)
    assert np.array_equal(a["image"], b["image"]) and a["label"] == b["label"]
    assert not np.array_equal(render(spec, 6)["image"], a["image"])
    assert not (a["mask"] & a["noise_mask"]).any() and a["noise_mask"].sum() == 2 * 64
    ds = ShapesDataset(200, ShapesSpec(image_size=64))
    fractions = [ds[i][2].mean().item() for i in range(200)]
    assert 0.03 < np.mean(fractions) < 0.1
    # the object's mean colour identifies the label
    for i in range(20):
        image, label, mask, sample_id = ds[i]
        colour = (image * 0.5 + 0.5)[:, mask.bool()].mean(1).numpy()
        palette = PALETTE[: ds.spec.num_classes]
        direction = palette / np.linalg.norm(palette, axis=1, keepdims=True)
        assert int((direction @ (colour / np.linalg.norm(colour))).argmax()) == label
        assert sample_id == i


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_checkpoint_path_loads_local_weights(tmp_path, suffix):
    kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
    source = timm.create_model("vit_tiny_patch16_224", num_classes=4, **kwargs)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    else:
        torch.save(source.state_dict(), path)
    loaded = create_vit("vit_tiny_patch16_224", num_classes=4, checkpoint_path=str(path), **kwargs)
    for (name, a), b in zip(source.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    # a different head size: backbone loaded, new head
    other = create_vit("vit_tiny_patch16_224", num_classes=7, checkpoint_path=str(path), **kwargs)
    assert torch.equal(other.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert other.head.out_features == 7
    with pytest.raises(ValueError, match="checkpoint_path"):
        create_vit("vit_tiny_patch16_224", num_classes=4, checkpoint_path=str(tmp_path / "missing.pth"))


def test_linear_probe_trains_only_the_head():
    module = ViTClassifier(model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}, freeze_backbone=True)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {"vit.head.weight", "vit.head.bias"}


def test_image_folder_uses_the_masks_that_exist(tmp_path):
    import pytest
    import torch

    from attnreg_lightning.metrics import token_mask

    root = write_image_tree(tmp_path)
    (root / "masks" / "val" / "dog" / "img1.png").unlink()
    dm = ImageFolderDataModule(str(root), num_classes=2, model_name="vit_tiny_patch16_224", image_size=32, batch_size=6)
    with pytest.warns(UserWarning, match="1 of 6 images .* have no mask"):
        dm.setup()
    batch = next(iter(dm.val_dataloader()))
    unknown = batch["mask"].flatten(1).isnan().all(1)
    assert unknown.tolist() == [False, False, False, False, True, False]  # dog/img1, fifth in sorted order
    tokens = token_mask(batch["mask"], (4, 4))
    assert not tokens[unknown].any() and tokens[~unknown].any(1).all()
    assert torch.equal(batch["mask"][0], batch["mask"][1])  # the others: the object's square, as on disk


def test_a_planted_shortcut_leaks_the_label_on_training_images_only():
    from attnreg_lightning.data.shapes import CUE_OFFSET, PALETTE

    spec = ShapesSpec(image_size=64, noise_squares=2, shortcut_size=8, shortcut_leak=0.75, shortcut_honest=0.5)
    train = [render(spec, i, train=True) for i in range(400)]
    val = [render(spec, i, train=False) for i in range(400)]
    for item in train[:50] + val[:50]:
        marker = item["shortcut_mask"]
        ys, xs = np.nonzero(marker)
        assert marker.sum() == 64 and ys.min() % 8 == 0 and xs.min() % 8 == 0  # whole 8-px tokens
        assert not (marker & (item["mask"] | item["noise_mask"])).any()
        cue = PALETTE[(item["cue_class"] + CUE_OFFSET) % len(PALETTE)]
        assert np.allclose(item["image"][:, marker], cue[:, None])
    rate = lambda items, key: np.mean([it[key] == it["label"] for it in items])  # noqa: E731
    # leaked 3 times in 4, plus the random quarter's own chance of 1 in 4; the object lies half the time
    assert abs(rate(train, "cue_class") - (0.75 + 0.25 / 4)) < 0.06
    assert abs(rate(train, "object_class") - (0.5 + 0.5 / 4)) < 0.06
    # validation images are honest, and their cue is random
    assert rate(val, "object_class") == 1.0 and abs(rate(val, "cue_class") - 0.25) < 0.06
    # the default spec draws the same images as before the option existed
    plain, again = render(ShapesSpec(image_size=64, noise_squares=2), 3), render(spec, 3, train=False)
    assert plain["label"] == again["label"] and np.array_equal(plain["mask"], again["mask"])
    assert not plain["shortcut_mask"].any() and plain["cue_class"] == -1


def test_the_datamodule_carries_the_shortcut_mask_and_the_callback_reads_it():
    from attnreg_lightning.batch import default_batch_to_images
    from attnreg_lightning.data.shapes import ShapesDataModule

    data = ShapesDataModule(train_size=8, val_size=8, batch_size=8, image_size=48, shortcut_size=8)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()))
    view = default_batch_to_images(batch)
    assert view.shortcut_masks is not None and torch.equal(view.shortcut_masks, batch[5])
    assert view.noise_masks.sum() == 0 and view.masks.sum() > 0  # no noise squares: an empty noise region
    assert (view.shortcut_masks.flatten(1).sum(1) == 64).all()


def test_a_shortcut_with_more_classes_than_cue_colours_is_refused():
    with pytest.raises(ValueError, match="shortcut_size=8 needs num_classes <= 4"):
        ShapesSpec(image_size=64, num_classes=6, shortcut_size=8)
    assert ShapesSpec(image_size=64, num_classes=6).shortcut_size == 0  # without a marker, any class count
