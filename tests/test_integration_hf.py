"""Hugging Face Trainer: the gradient the optimizer steps on is the method's, window by window.

A two-layer BERT built from a config (nothing downloaded) trains for sequence classification under
``FlatTrainer``; a callback records the weights at the start of each accumulation window and the
gradient right before ``optimizer.step()`` (after the Trainer's clipping). The reference replays
each window with ``method.backward`` on a copy of the model: the model's own loss, each
micro-batch scaled by 1/k, then ``clip_grad_norm_``.
"""

from __future__ import annotations

import copy

import pytest
import torch

import flatminima as fm

transformers = pytest.importorskip("transformers")

from flatminima.integrations import ModelLoss  # noqa: E402
from flatminima.integrations._common import backward_scaler  # noqa: E402
from flatminima.integrations.hf import STATE_FILE, FlatTrainer  # noqa: E402
from tests._torchrun import two_ranks  # noqa: E402


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=16, num_labels=3,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(cfg)


def dataset(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 40, (n, length), generator=g)
    labels = ids[:, 0] % 3
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long),
             "labels": labels[i]} for i in range(n)]


class Recorder(transformers.TrainerCallback):
    """Weights at each window's start, the batches of each window, the gradient at each step."""

    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []
        self.grads: list[list[torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append([p.grad.detach().clone() for p in model.parameters()
                           if p.requires_grad])


class RecordingTrainer(FlatTrainer):
    batches: list[dict[str, torch.Tensor]]

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.batches.append({k: v.clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_grad_norm=0.05, num_train_epochs=1,
                learning_rate=0.1, optim="sgd", lr_scheduler_type="constant",
                weight_decay=0.0, report_to="none", save_strategy="no", logging_steps=1,
                use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


def own_loss(model, batch, _):
    out = model(**batch)
    return out.loss, out.logits


@pytest.mark.parametrize("name", ["sam", "nrs", "friendlysam"])
def test_trainer_steps_on_the_methods_gradient_with_accumulation_and_clipping(name, tmp_path):
    model = tiny_bert()
    reference_model = copy.deepcopy(model)
    recorder = Recorder()
    trainer = RecordingTrainer(model=model, args=args(tmp_path), train_dataset=dataset(),
                               callbacks=[recorder], flat_method=fm.create_method(name),
                               flat_generator=torch.Generator().manual_seed(7))
    trainer.batches = []
    trainer.train()
    assert len(recorder.grads) == 2 and len(trainer.batches) == 4
    ref, gen = fm.create_method(name), torch.Generator().manual_seed(7)
    params = [p for p in reference_model.parameters() if p.requires_grad]
    clipped = 0
    for window, (weights, grads) in enumerate(zip(recorder.weights, recorder.grads,
                                                  strict=True)):
        reference_model.load_state_dict(weights)
        reference_model.train()
        for p in params:
            p.grad = None
        for batch in trainer.batches[2 * window: 2 * window + 2]:
            ref.backward(reference_model, batch, None, ModelLoss(own_loss),
                         scaler=backward_scaler(None, 0.5), generator=gen)
        norm = torch.nn.utils.clip_grad_norm_(params, 0.05)
        clipped += float(norm) > 0.05
        for got, want in zip(grads, [p.grad for p in params], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
    assert clipped == 2  # the clipping was active, so it was tested
    logged = [row for row in trainer.state.log_history if "flat_perturbed_loss" in row]
    assert logged and (name != "nrs" or "flat_divergence" in logged[0])


def test_bf16_autocast_on_the_cpu_reaches_the_method(tmp_path):
    model = tiny_bert()
    reference_model = copy.deepcopy(model)
    recorder = Recorder()
    trainer = RecordingTrainer(model=model, args=args(tmp_path, bf16=True,
                                                      gradient_accumulation_steps=1,
                                                      max_grad_norm=0.0),
                               train_dataset=dataset(4), callbacks=[recorder],
                               flat_method=fm.SAM(rho=0.05))
    trainer.batches = []
    trainer.train()
    reference_model.load_state_dict(recorder.weights[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fm.SAM(rho=0.05).backward(reference_model, trainer.batches[0], None, ModelLoss(own_loss))
    for got, p in zip(recorder.grads[0], reference_model.parameters(), strict=True):
        torch.testing.assert_close(got, p.grad, rtol=1e-3, atol=1e-6)


def test_resume_restores_the_methods_state_and_continues_the_same_run(tmp_path):
    def run(out, resume=None, steps=4):
        trainer = FlatTrainer(
            model=tiny_bert(), args=args(tmp_path, output_dir=str(out), max_steps=steps,
                                         save_strategy="steps", save_steps=2,
                                         gradient_accumulation_steps=1),
            train_dataset=dataset(), flat_method=fm.Every(fm.NRS(), every=2, reuse="difference"),
            flat_generator=torch.Generator().manual_seed(7))
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    saved = torch.load(tmp_path / "whole" / "checkpoint-2" / STATE_FILE, weights_only=False)
    assert saved["method"] == "every(nrs)" and saved["state"]["count"] == 2
    resumed = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-2"))
    assert resumed.flat_method.state_dict()["count"] == 4
    for p, q in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_checkpoint_of_another_method_is_refused(tmp_path):
    trainer = FlatTrainer(model=tiny_bert(), args=args(tmp_path, max_steps=2, save_steps=2,
                                                       save_strategy="steps"),
                          train_dataset=dataset(), flat_method=fm.SAM())
    trainer.train()
    other = FlatTrainer(model=tiny_bert(), args=args(tmp_path, max_steps=4),
                        train_dataset=dataset(), flat_method=fm.RPR())
    with pytest.raises(ValueError, match="trained with method 'sam'"):
        other.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))


def test_the_trainers_ddp_reduces_the_methods_gradient_once(tmp_path):
    """Two CPU ranks under torchrun (tests/hf_ddp_worker.py), two accumulated micro-batches: the
    gradient at the step is the mean over ranks of each rank's own method gradient."""
    two_ranks("hf_ddp_worker.py", "nrs", cwd=tmp_path)
