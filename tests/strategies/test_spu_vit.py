"""SPU on clbench's ViT (the paper's real target): only the selected weights of each MLP block's first layer, their
biases and the heads move; attention, the second MLP layers, norms and embeddings stay bit-identical."""

from __future__ import annotations

import torch

from clbench.models import ViT
from clbench.streams import split_stream
from clbench.trainer import Trainer
from strategies.spu import SPU


def test_vit_keeps_everything_but_the_selected_fc1_weights_their_biases_and_the_heads():
    from clbench.data import load_digits

    stream = split_stream(load_digits(), num_tasks=2, classes_per_task=2, train_per_task=64)
    torch.manual_seed(0)
    model = ViT(list(stream.input_shape), stream.head_sizes, patch_size=4, dim=32, depth=2, num_heads=2)
    spu = SPU(fraction=0.1, buffer_size=20)
    spu.setup(model, stream)
    assert list(spu._candidates) == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    trainer = Trainer(epochs=2, batch_size=32, lr=0.01, optimizer="adamw", weight_decay=0.1, progress=False)
    trainer.attach(stream, 0)
    for task in stream:
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        spu.fit_task(task, trainer)
        spu.after_task(task)
        for name, param in model.named_parameters():
            layer = name.rsplit(".", 1)[0]
            if layer in spu.masks and name.endswith("weight"):
                mask = spu.masks[layer]
                assert torch.equal(param[~mask], before[name][~mask]), name
                assert not torch.equal(param[mask], before[name][mask]), name
            elif name.startswith("heads.") or (layer in spu.masks and name.endswith("bias")):
                continue  # trained in full (a head of a task not seen yet gets no gradient)
            else:
                assert torch.equal(param, before[name]), name
