"""Several members' fits trained as one batched model: the same steps as their solo fits, in one pass.

Members whose fits have the same shape (strategy class, MLP layer shapes, samples, batch size, epochs) are
trained together. Each keeps everything of its own: its batch order (its trainer's generator draws the same
permutations as in its solo run), its strategy's hooks and state, its optimizer, its loss checks. Only the
model's arithmetic is shared: every linear layer's parameters of all members are stacked into one
``[members, out, in]`` tensor, each member's ``Parameter`` is re-pointed at its slice of it for the fit (its
optimizer updates the slice in place; the fit's end gives each parameter its own storage again), and one
batched matrix product replaces one small product per member.

Two kinds of step, chosen per fit as the solo trainer chooses:

* ``closed_form`` (the MLP's gradients written out, :mod:`clbench.closed_form`; what a solo CPU run of
  fine-tune, joint or GPM takes): ``baddbmm`` / ``bmm`` in place of ``F.linear`` / ``mm``, a softmax over the
  last axis of ``[members, rows, classes]`` and per-member ``linear_gradient`` hooks (GPM's projection).
* ``autograd`` (a strategy that adds to the loss or reads ``.grad``, on clbench's MLP with the strategy's
  default ``forward``: EWC, online EWC, SI, MAS, LwF): the body's batched forward through
  :class:`BatchedLinear`, whose backward forms each member's gradients with the same products as
  ``F.linear``'s backward; each member's own heads then run on its slice of the features
  (``Strategy.forward_heads``, where LwF keeps them), its ``loss`` hook reads its own logits, and its
  regulariser's gradient (taken on its own parameters) is added to the batched one.

On one CPU thread the kernels for one member's slice are the solo run's kernels, so every member's R is
bit-identical to its solo run (``benchmarks/results/population_correctness.md``); with more threads BLAS
splits the sums of a batched product differently from a single one, and the runs agree within float rounding.
A fit that fits neither kind (another model, a strategy with its own forward pass, a validation-driven lr
schedule) is run by each member alone (:data:`~clbench.population.rendezvous.TRAIN_ALONE`), one after another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from clbench.batches import TrainingSet
from clbench.closed_form import BODY_TYPES, ClosedFormStep, KeptLogits, closed_form_obstacle
from clbench.divergence import FiniteLossCheck, check_finite
from clbench.loggers.progress import task_progress
from clbench.masking import absent_classes, batch_absent, mask_absent
from clbench.models.mlp import MLP
from clbench.optim import SGD, FitOptimizer
from clbench.population.rendezvous import FitRequest
from clbench.strategy import Batch, Strategy

CLOSED_FORM, AUTOGRAD = "closed_form", "autograd"


class BatchedLinear(torch.autograd.Function):
    """``x @ W^T + b`` for every member at once (``x``: ``[N, B, in]``, ``W``: ``[N, out, in]``, ``b``:
    ``[N, out]`` or None), whose backward takes the products ``F.linear``'s backward takes for one member:
    ``grad_W = g^T x`` (``mm(g.t(), x)``, as autograd does for a transposed weight), ``grad_x = g W``,
    ``grad_b = sum over rows of g``. Torch's own ``bmm`` backward forms ``(x^T g)^T`` instead, which sums
    in another order and would make a member's gradient differ from its solo run in the last bits."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return stacked_linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        grad_x = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.mT, x) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(dim=1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias


def stacked_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Every member's ``F.linear`` as one batched product (``baddbmm`` with the bias, the same sums as
    ``addmm``; ``bmm`` without, as ``mm``)."""
    if bias is None:
        return torch.bmm(x, weight.mT)
    return torch.baddbmm(bias.unsqueeze(1), x, weight.mT)


def has_module_hooks(model: nn.Module) -> bool:
    """Whether any submodule has forward or backward hooks (a batched pass would not call them)."""
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or getattr(m, "_backward_pre_hooks", None)
        for m in model.modules()
    )


def step_kind(request: FitRequest) -> str | None:
    """How this fit can be batched with others: ``closed_form``, ``autograd``, or None (trained alone)."""
    trainer, strategy = request.trainer, request.strategy
    model = strategy.model
    if trainer.validates or trainer.compile is not None or trainer.amp is not None or type(model) is not MLP:
        return None
    if any(not isinstance(m, BODY_TYPES) for m in model.body):
        return None
    if trainer.closed_form is not False and closed_form_obstacle(model, strategy, None, False) is None:
        return CLOSED_FORM  # calls no module, as the solo closed-form step: module hooks (GPM's) stay unused
    if trainer.closed_form is True or type(strategy).forward is not Strategy.forward or has_module_hooks(model):
        return None
    return AUTOGRAD


@dataclass
class MemberFit:
    """One member's part of a batched fit: what its solo ``Trainer.fit`` would hold."""

    request: FitRequest
    kind: str
    layers: list[tuple[nn.Linear, Tensor, Tensor | None]]
    data: TrainingSet
    trained: list[nn.Parameter]
    optimizer: FitOptimizer
    absent: Tensor | None
    checks: FiniteLossCheck
    epochs: int
    closed: ClosedFormStep | None = None
    error: BaseException | None = None
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, request: FitRequest, kind: str) -> MemberFit | None:
        """The member's fit, or None where its batches would mix tasks with per-task heads."""
        trainer, strategy, tasks = request.trainer, request.strategy, request.tasks
        assert trainer.stream is not None, "Trainer.attach(stream, seed) must run before fit"
        data = TrainingSet.of(tasks)
        step = ClosedFormStep.for_fit(strategy.model, strategy, data.task_ids)
        if step is None:
            return None
        trained = list(strategy.parameters(tasks[-1]) if request.params is None else request.params)
        return cls(
            request=request,
            kind=kind,
            layers=step.layers,
            data=data,
            trained=trained,
            optimizer=trainer._fit_optimizer(trained),
            absent=absent_classes(trainer.stream, tasks),
            checks=FiniteLossCheck(data.steps(trainer.batch_size), trainer.nan_checks_per_epoch),
            epochs=trainer.epochs if request.epochs is None else request.epochs,
            closed=step if kind == CLOSED_FORM else None,
        )

    @property
    def alive(self) -> bool:
        return self.error is None

    def key(self) -> tuple[Any, ...]:
        """Fits with equal keys can share batched steps."""
        trainer = self.request.trainer
        shapes = tuple(
            (tuple(w.shape), w.dtype, w.requires_grad, None if b is None else b.requires_grad)
            for _, w, b in self.layers
        )
        return (
            self.kind,
            type(self.request.strategy),
            trainer.stream.device,
            trainer.batch_size,
            self.epochs,
            self.data.num_samples,
            trainer.nan_checks_per_epoch,
            shapes,
            None if self.closed is None else self.closed.custom_gradients,
        )

    def batches(self, shuffled: TrainingSet) -> Iterator[tuple[int, slice, Batch, int]]:
        """The epoch's batches, inputs made a block at a time as the solo fit makes them."""
        trainer = self.request.trainer
        prepare = trainer.block_inputs(self.request.strategy, self.request.tasks[-1], self.closed is not None)
        return shuffled.batches(trainer.batch_size, trainer.prefetch_steps(), prepare)


class _Quiet:
    """A progress display that shows nothing (a member's loss check closes it before raising)."""

    def close(self) -> None:
        pass


class Stacks:
    """Each layer's weights and biases of all members stacked, the members' parameters re-pointed at their
    slices for the fit; :meth:`release` gives every parameter its own storage again."""

    def __init__(self, fits: Sequence[MemberFit], requires_grad: bool, layers: int) -> None:
        self.tensors: list[tuple[Tensor, Tensor | None]] = []
        self.params: list[list[Tensor]] = []
        self.trainable: list[tuple[bool, bool]] = []  # per layer: weight, bias require gradients
        self.grads: list[tuple[Tensor, Tensor]] = []  # (stack, its gradient) of the last shared update
        for depth in range(layers):
            weights = [f.layers[depth][1] for f in fits]
            biases = [f.layers[depth][2] for f in fits]
            self.trainable.append((weights[0].requires_grad, biases[0] is not None and biases[0].requires_grad))
            stacked_w = self._stack(weights, requires_grad)
            stacked_b = None if biases[0] is None else self._stack(biases, requires_grad)
            self.tensors.append((stacked_w, stacked_b))

    def _stack(self, params: list[Tensor], requires_grad: bool) -> Tensor:
        stacked = torch.stack([p.detach() for p in params])
        for i, param in enumerate(params):
            param.data = stacked[i]
        self.params.append(params)
        if requires_grad and params[0].requires_grad:
            stacked.requires_grad_(True)
        return stacked

    def check_linked(self, strategy_name: str) -> None:
        """Raise where a hook replaced a parameter's tensor (its updates would no longer reach the stack)."""
        for params in self.params:
            base = params[0].data.untyped_storage().data_ptr()
            if any(p.data.untyped_storage().data_ptr() != base for p in params):
                raise RuntimeError(
                    f"strategy {strategy_name!r} replaced a parameter's tensor during a batched population fit: "
                    "update parameters in place, or do not declare population_safe"
                )

    def release(self) -> None:
        """Every parameter gets its own storage again (and, after shared updates, the last step's gradient,
        as a solo fit leaves it)."""
        with torch.no_grad():
            grads = {id(stack): grad for stack, grad in self.grads}
            for params, stack in zip(
                self.params, [t for pair in self.tensors for t in pair if t is not None], strict=True
            ):
                for i, param in enumerate(params):
                    param.data = param.data.clone()
                    if id(stack) in grads:
                        param.grad = grads[id(stack)][i].clone()


def fit_together(fits_: Sequence[MemberFit]) -> list[Any]:
    """Train the members' fits (of one :meth:`MemberFit.key`) in one batched loop; per fit, its epoch losses
    or the error that ended it, as its solo ``Trainer.fit`` would have returned or raised."""
    kind = fits_[0].kind
    strategy_name = fits_[0].request.strategy.name
    rng_before = torch.get_rng_state()
    # the autograd step stacks the body only: each member's heads run on its features (Strategy.forward_heads)
    stacks = Stacks(fits_, requires_grad=kind == AUTOGRAD, layers=len(fits_[0].layers) - (kind == AUTOGRAD))
    try:
        grad_mode = torch.no_grad() if kind == CLOSED_FORM else contextlib.nullcontext()
        with grad_mode:
            _loop(fits_, stacks, kind)
        stacks.check_linked(strategy_name)
    finally:
        stacks.release()
    if not torch.equal(rng_before, torch.get_rng_state()):
        raise RuntimeError(
            f"strategy {strategy_name!r} drew from torch's global generator during a batched population fit, which "
            "makes its members differ from their solo runs: do not declare population_safe"
        )
    results: list[Any] = []
    for f in fits_:
        if f.error is not None:
            results.append(f.error)
            continue
        trainer = f.request.trainer
        trainer.closed_form_steps.append(f.checks.steps * len(f.losses) if kind == CLOSED_FORM else 0)
        trainer.epoch_losses.append(f.losses)
        trainer.epoch_accuracies.append(f.accuracies)
        trainer.val_losses.append([])
        results.append(f.losses)
    return results


def _loop(fits: Sequence[MemberFit], stacks: Stacks, kind: str) -> None:
    first = fits[0]
    trainer0, current0 = first.request.trainer, first.request.tasks[-1]
    steps, epochs, batch_size = first.checks.steps, first.epochs, trainer0.batch_size
    device = first.data.index.device
    for f in fits:
        for module in f.request.strategy.eval_modules():
            module.train()
    bar = task_progress(epochs * steps, current0.id, len(trainer0.stream), trainer0.progress)
    minus_one: dict[int, Tensor] = {}
    shared_lr = shared_plain_sgd(fits, stacks) if kind == CLOSED_FORM else None
    for epoch in range(epochs):
        shuffled = [f.data.shuffled(f.request.trainer.generator) for f in fits]
        step_losses = [torch.zeros(steps, device=device) for _ in fits]
        predictions = [torch.empty(f.data.num_samples, device=device, dtype=torch.int64) for f in fits]
        kept = [
            KeptLogits(batch_size, s.targets, loss, pred) if kind == CLOSED_FORM else None
            for s, loss, pred in zip(shuffled, step_losses, predictions, strict=True)
        ]
        iterators = [f.batches(s) for f, s in zip(fits, shuffled, strict=True)]
        for step in range(steps):
            items = [next(it) for it in iterators]
            chosen = items[0][1]
            batches = [item[2] for item in items]
            if kind == CLOSED_FORM:
                for k, item, f in zip(kept, items, fits, strict=True):
                    if item[3]:
                        k.start_block(step, item[3], f.layers[-1][1])
                rows = batches[0].y.shape[0]
                if rows not in minus_one:
                    minus_one[rows] = torch.full((len(fits), rows, 1), -1.0, device=device)
                _closed_form_step(fits, stacks, batches, [k.rows(chosen) for k in kept], minus_one[rows], shared_lr)
            else:
                losses, predicted = _autograd_step(fits, stacks, batches)
                for i, f in enumerate(fits):
                    if f.alive:
                        step_losses[i][step] = losses[i]
                        predictions[i][chosen] = predicted[i]
            bar.update(1)
            if first.checks.due(step):
                for i, f in enumerate(fits):
                    if not f.alive:
                        continue
                    if kept[i] is not None:
                        kept[i].settle(step + 1)
                    try:
                        check_finite(step_losses[i][: step + 1], f.request.tasks[-1], epoch, _Quiet())
                    except FloatingPointError as error:
                        f.error = error
        for i, f in enumerate(fits):
            if not f.alive:
                continue
            hits = (predictions[i] == shuffled[i].targets).sum()
            mean_loss = float(step_losses[i].mean())
            f.losses.append(mean_loss)
            f.accuracies.append(float(hits) * 100.0 / f.data.num_samples)
        if not any(f.alive for f in fits):
            break
    bar.close()


def shared_plain_sgd(fits: Sequence[MemberFit], stacks: Stacks) -> float | None:
    """The learning rate where every member's step is a plain SGD update of exactly the stacked parameters
    with no hook around it (fine-tune, joint): one ``_foreach_add_`` on the stacks then updates every member,
    the same elementwise operation as each member's own; None where a member's step is anything else."""
    lrs = set()
    stacked = [p for params in stacks.params for p in params if p.requires_grad]
    for i, f in enumerate(fits):
        strategy, optimizer = f.request.strategy, f.optimizer
        if not isinstance(optimizer, SGD) or f.closed is None or f.closed.custom_gradients:
            return None
        group = optimizer.param_groups[0]
        if group["momentum"] != 0 or group["weight_decay"] != 0:
            return None
        if (
            type(strategy).after_backward is not Strategy.after_backward
            or type(strategy).after_step is not Strategy.after_step
        ):
            return None
        if {id(p) for p in f.trained} != {id(p) for p in stacked[i :: len(fits)]}:
            return None
        lrs.add(group["lr"])
    return lrs.pop() if len(lrs) == 1 else None


def _closed_form_step(
    fits: Sequence[MemberFit],
    stacks: Stacks,
    batches: Sequence[Batch],
    outs: Sequence[Tensor],
    minus_one: Tensor,
    shared_lr: float | None,
) -> None:
    """One closed-form step of every member (:meth:`clbench.closed_form.ClosedFormStep._step`, batched); with
    ``shared_lr`` (:func:`shared_plain_sgd`) the update is applied to the stacks at once."""
    activations = [torch.stack([b.x.flatten(1) for b in batches])]
    layers = stacks.tensors
    for weight, bias in layers[:-1]:
        activations.append(stacked_linear(activations[-1], weight, bias).relu_())
    logits = stacked_linear(activations[-1], *layers[-1])
    for i, (f, batch) in enumerate(zip(fits, batches, strict=True)):
        mask = batch_absent(f.request.trainer.stream, f.absent, batch.y)
        if mask is not None:
            logits[i].masked_fill_(mask, torch.finfo(logits.dtype).min)
        outs[i].copy_(logits[i])
    rows = batches[0].y.shape[0]
    targets = torch.stack([b.y for b in batches]).unsqueeze(2)
    delta = logits.softmax(dim=2).scatter_add_(2, targets, minus_one).div_(rows)
    if shared_lr is not None:
        _shared_update(layers, activations, delta, shared_lr, stacks)
        return
    for f in fits:
        f.optimizer.zero_grad(set_to_none=True)
    for depth in range(len(layers) - 1, -1, -1):
        weight, bias = layers[depth]
        inputs = activations[depth]
        plain_weight: Tensor | None = None
        plain_bias: Tensor | None = None
        for i, (f, batch) in enumerate(zip(fits, batches, strict=True)):
            if not f.alive:
                continue
            module, member_weight, member_bias = f.layers[depth]
            assert f.closed is not None
            given = (
                f.request.strategy.linear_gradient(module, inputs[i], delta[i], batch)
                if f.closed.custom_gradients
                else None
            )
            if given is not None:
                member_weight.grad = given if member_bias is None else given[:, :-1].contiguous()
                if member_bias is not None:
                    member_bias.grad = given[:, -1].contiguous()
                continue
            if member_weight.requires_grad:
                if plain_weight is None:
                    plain_weight = delta.mT @ inputs
                member_weight.grad = plain_weight[i]
            if member_bias is not None and member_bias.requires_grad:
                if plain_bias is None:
                    plain_bias = delta.sum(dim=1)
                member_bias.grad = plain_bias[i]
        if depth > 0:
            delta = torch.ops.aten.threshold_backward(delta @ weight, inputs, 0)
    _hooks_and_updates(fits)


def _shared_update(
    layers: list[tuple[Tensor, Tensor | None]], activations: list[Tensor], delta: Tensor, lr: float, stacks: Stacks
) -> None:
    """Every member's gradients formed batched and its SGD update applied to the stacks in one call; the last
    step's gradients are kept (``stacks.grads``) and handed to the members when the fit ends."""
    params: list[Tensor] = []
    grads: list[Tensor] = []
    for depth in range(len(layers) - 1, -1, -1):
        weight, bias = layers[depth]
        inputs = activations[depth]
        if stacks.trainable[depth][0]:
            params.append(weight)
            grads.append(delta.mT @ inputs)
        if bias is not None and stacks.trainable[depth][1]:
            params.append(bias)
            grads.append(delta.sum(dim=1))
        if depth > 0:
            delta = torch.ops.aten.threshold_backward(delta @ weight, inputs, 0)
    torch._foreach_add_(params, grads, alpha=-lr)
    stacks.grads = list(zip(params, grads, strict=True))


def _autograd_step(
    fits: Sequence[MemberFit], stacks: Stacks, batches: Sequence[Batch]
) -> tuple[list[Tensor], list[Tensor]]:
    """One autograd step of every member: batched forward, each member's own loss, one backward."""
    layers = stacks.tensors
    for weight, bias in layers:
        weight.grad = None
        if bias is not None:
            bias.grad = None
    hidden = torch.stack([b.x for b in batches]).flatten(2)
    for weight, bias in layers:
        hidden = F.relu(BatchedLinear.apply(hidden, weight, bias))
    losses: list[Tensor] = []
    outputs: list[Tensor] = []
    for i, (f, batch) in enumerate(zip(fits, batches, strict=True)):
        output = f.request.strategy.forward_heads(hidden[i], batch.task_ids)  # its own heads, on its features
        output = mask_absent(output, batch_absent(f.request.trainer.stream, f.absent, batch.y))
        outputs.append(output)
        if f.alive:
            losses.append(f.request.strategy.loss(output, batch.y, batch, f.request.tasks[-1]))
    for f in fits:
        f.optimizer.zero_grad(set_to_none=True)
    if losses:
        torch.stack(losses).sum().backward()
    for depth, (weight, bias) in enumerate(layers):  # the body's gradients, from the stacks to each member
        for stacked, member_index in ((weight, 1), (bias, 2)):
            if stacked is None or stacked.grad is None:
                continue
            for i, f in enumerate(fits):
                param = f.layers[depth][member_index]
                if not f.alive or param is None:
                    continue
                own = stacked.grad[i]
                # a regulariser's gradient, taken on the member's own parameter, is already there: add (a + b is
                # b + a in floating point, so the order of the two contributions does not matter)
                param.grad = own if param.grad is None else param.grad + own
    _hooks_and_updates(fits)
    alive_losses = iter(losses)
    detached = [next(alive_losses).detach() if f.alive else torch.zeros(()) for f in fits]
    return detached, [o.detach().argmax(dim=1) for o in outputs]


def _hooks_and_updates(fits: Sequence[MemberFit]) -> None:
    """Each live member's ``after_backward``, optimizer step and ``after_step``, in the solo step's order."""
    for f in fits:
        if not f.alive:
            continue
        strategy, task = f.request.strategy, f.request.tasks[-1]
        strategy.after_backward(task)
        f.optimizer.step()
        strategy.after_step(task)
