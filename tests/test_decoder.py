"""The multimodal decoder with the texts of one image attending to it together equals open_clip's decoder given
each text its own copy of its image: states and gradients."""

from __future__ import annotations

import torch
from open_clip.transformer import MultimodalTransformer

from pretrainlab.models.decoder import MultimodalDecoder, TextGroups


def decoders(width: int = 32, layers: int = 2, heads: int = 4, context: int = 12):
    torch.manual_seed(0)
    grouped = MultimodalDecoder(width, layers, heads, context, output_dim=width)
    torch.nn.init.normal_(grouped.text_projection, std=width**-0.5)
    reference = MultimodalTransformer(width, layers, heads, context, output_dim=width)
    reference.load_state_dict(grouped.state_dict())
    return grouped, reference


def test_text_groups_lay_out_each_images_texts_side_by_side_and_back():
    owners = torch.tensor([2, 0, 2, 2, 0])  # image 1 has no text
    texts = torch.arange(5 * 3 * 2, dtype=torch.float32).view(5, 3, 2)
    groups = TextGroups(owners, images=3)
    grouped = groups.group(texts)
    assert grouped.shape == (3, 3 * 3, 2)
    torch.testing.assert_close(grouped[0, :6], torch.cat([texts[1], texts[4]]))
    assert not grouped[0, 6:].any() and not grouped[1].any()
    torch.testing.assert_close(grouped[2], torch.cat([texts[0], texts[2], texts[3]]))
    torch.testing.assert_close(groups.ungroup(grouped), texts)


def test_grouped_decoding_equals_one_image_copy_per_text_with_gradients():
    grouped, reference = decoders()
    images = torch.randn(4, 9, 32, requires_grad=True)
    texts = torch.randn(7, 10, 32, requires_grad=True)
    owners = torch.tensor([3, 0, 3, 1, 3, 0, 1])  # unsorted, uneven, image 2 unused
    expected = reference(images[owners], texts)
    got = grouped(images, texts, owners)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    weights = torch.randn_like(expected)
    expected_grads = torch.autograd.grad((expected * weights).sum(), [images, texts, *reference.parameters()])
    got_grads = torch.autograd.grad((got * weights).sum(), [images, texts, *grouped.parameters()])
    for want, have in zip(expected_grads, got_grads, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-5)
    assert not got_grads[0][2].any()


def test_without_owners_each_text_attends_to_its_own_image_row():
    grouped, reference = decoders()
    images, texts = torch.randn(3, 9, 32), torch.randn(3, 10, 32)
    torch.testing.assert_close(grouped(images, texts), reference(images, texts))
