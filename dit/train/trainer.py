"""The training loop on accelerate: objectives, gradient accumulation, clipping, EMA, logging, validation,
checkpoints with automatic resume, and the final export.

Reproducibility: batch k comes from a deterministic stream (dit.train.data.BatchStream), and every random
draw of step s (VAE posterior sample, caption dropout, timesteps, noise) comes from a generator seeded by
(seed, data-parallel rank, s, micro-step). A resumed run therefore continues the same loss curve as an
uninterrupted one; accelerate's RNG states are saved and restored as well, for anything else that draws.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dit.sampling import denoise
from dit.outputs import atomic_write, atomic_write_text, check_not_symlink, open_append_nofollow, write_video
from dit.train import checkpoint as ckpt
from dit.train.config import TrainConfig
from dit.train.data import BatchStream, build_source, cache_fingerprint, make_loader
from dit.train.launch import die_with_launcher, exclusive_output_dir
from dit.train.models import ModelBundle, build_bundle
from dit.train.objectives import AutoencoderStep, Objective, autoencoder_loss, low_resolution
from dit.train.parallel import enable_context_parallel, layout_for


def step_generator(seed: int, dp_rank: int, step: int, micro: int) -> torch.Generator:
    """The generator of one micro-step: shared by the ranks of a CP group, distinct across DP ranks and steps."""
    state = np.random.SeedSequence([seed, dp_rank, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class Trainer:
    def __init__(self, cfg: TrainConfig, accelerator=None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        die_with_launcher()  # before anything slow: a worker whose launcher is gone must not start training
        self.cfg = cfg
        t = cfg.train
        # accelerate's CPU path (--cpu) launches one process and expects mpirun for more; torchrun-style launches
        # (multi_gpu launcher) on a machine without CUDA need cpu=True to pick gloo instead of failing over to
        # independent single-process runs.
        cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = accelerator or Accelerator(mixed_precision=t.mixed_precision, cpu=cpu)
        acc = self.accelerator
        self.layout = layout_for(cfg.parallel, acc.process_index, acc.num_processes)
        self.output = Path(cfg.output_dir)
        set_seed(t.seed)  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
        self.bundle: ModelBundle = build_bundle(cfg.model, cfg.objective)
        self.objective = Objective(cfg.objective)
        # An autoencoder run trains the VAE (wrapped so that one module call gives what the loss needs); every
        # other objective trains the transformer.
        self.trains_vae = cfg.objective.kind == "autoencoder"
        if self.trains_vae:
            if t.gradient_checkpointing:
                self.bundle.vae.enable_gradient_checkpointing()
            trained = AutoencoderStep(self.bundle.vae.requires_grad_(True).train())
        else:
            trained = self.bundle.transformer
            if t.gradient_checkpointing:
                trained.enable_gradient_checkpointing()
            enable_context_parallel(trained, cfg.parallel, self.layout)
        self.params = [p for p in trained.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("model: nothing to train (no parameter requires grad)")
        o = cfg.optim
        optimizer = torch.optim.AdamW(self.params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay, eps=o.eps)
        from diffusers.optimization import get_scheduler

        self.lr_scheduler = get_scheduler(o.lr_schedule, optimizer, num_warmup_steps=o.warmup_steps,
                                          num_training_steps=t.steps)
        self._check_distributed_type()
        self.model, self.optimizer = acc.prepare(trained, optimizer)
        for module in self.bundle.frozen_modules():
            module.to(acc.device)
        self.ema = ckpt.EMA(self.params, t.ema_decay) if t.ema_decay is not None else None
        # The LR schedule is stepped once per optimizer step by us (not by accelerate, which would step it once
        # per process); it and the EMA are saved by ckpt.save_checkpoint, not registered with accelerate (which
        # would pickle them).
        self.source = build_source(cfg.data, t.seed, fingerprint=cache_fingerprint(cfg) if cfg.data.cache else None)
        self.bundle.check_sizes(self.source.buckets)
        self.stream = BatchStream(tuple(self.source.bucket_of), t.batch_size, self.layout.dp_rank,
                                  self.layout.dp_size, t.seed)
        self.step = 0
        self.writer = None

    def _sharded(self) -> bool:
        """FSDP or ZeRO-3: each rank holds only shards of the parameters."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.FSDP:
            return True
        if kind == DistributedType.DEEPSPEED:
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            return ds.get("zero_optimization", {}).get("stage") == 3
        return False

    def _check_distributed_type(self) -> None:
        """What this trainer does not do right yet under sharded engines: refuse rather than train wrongly."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        if kind == DistributedType.DEEPSPEED and self.cfg.optim.grad_accumulation != 1:
            raise ValueError("optim.grad_accumulation: DeepSpeed accumulates itself; set it to 1 here and "
                             "gradient_accumulation_steps in the DeepSpeed config instead")
        if kind == DistributedType.DEEPSPEED:
            # accelerate reads the micro-batch size from a prepared DataLoader, and ours is not prepared (the batch
            # stream shards the data itself).
            ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if ds.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                ds["train_micro_batch_size_per_gpu"] = self.cfg.train.batch_size
        if self._sharded() and self.cfg.train.ema_decay is not None:
            raise ValueError("train.ema_decay: the EMA keeps full unsharded copies on every rank and is not supported "
                             "with FSDP or ZeRO-3 yet; accepted there: null (or launch with DDP / ZeRO-2)")

    # -- one step ----------------------------------------------------------------------------------------------------

    def _latents(self, batch: dict[str, Any], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        device, b = self.accelerator.device, self.bundle
        drop = self.cfg.data.caption_dropout
        if "cached" in batch:
            c = {k: v.to(device) for k, v in batch["cached"].items()}
            z0 = b.sample_posterior(c["latent_mean"], c["latent_std"], g)
            z_low = b.sample_posterior(c["low_mean"], c["low_std"], g) if "low_mean" in c else None
            cond = {k[5:]: v for k, v in c.items() if k.startswith("cond.")}
            if drop:
                empty = self.source.empty_caption()
                keep = torch.rand(z0.shape[0], generator=g) >= drop
                for k in cond:
                    mask = keep.to(device).view(-1, *[1] * (cond[k].ndim - 1))
                    cond[k] = torch.where(mask, cond[k], empty[k].to(device, cond[k].dtype))
            return z0, z_low, cond
        video = batch["video"].to(device)
        z0 = b.sample_posterior(*b.encode_posterior(video), g)
        z_low = None
        if self.objective.needs_low_res:
            z_low = b.sample_posterior(*b.encode_posterior(low_resolution(video, self.cfg.objective.scale_factor)), g)
        captions = list(batch["caption"])
        if drop:
            keep = torch.rand(len(captions), generator=g) >= drop
            captions = [c if k else "" for c, k in zip(captions, keep.tolist())]
        return z0, z_low, b.encode_text(captions, device)

    def _loss(self, batch: dict[str, Any], g: torch.Generator) -> torch.Tensor:
        if self.trains_vae:
            video = batch["video"].to(self.accelerator.device).permute(0, 2, 1, 3, 4)  # (B, F, 3, H, W) -> (B, 3, F, H, W)
            o = self.cfg.objective
            return autoencoder_loss(self.model, video, g, o.kl_weight, o.l2_weight)
        z0, z_low, cond = self._latents(batch, g)

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.bundle.forward(self.model, x, t, cond)

        return self.objective.loss(model_fn, z0, g, z_low=z_low)

    def train_step(self, batches) -> float:
        """One optimizer step over grad_accumulation micro-batches; returns the mean loss over all DP ranks."""
        acc, ga = self.accelerator, self.cfg.optim.grad_accumulation
        total = torch.zeros((), device=acc.device)
        self.model.train()
        for micro in range(ga):
            batch = next(batches)
            g = step_generator(self.cfg.train.seed, self.layout.dp_rank, self.step, micro)
            sync = micro == ga - 1
            ctx = acc.no_sync(self.model) if not sync else contextlib.nullcontext()
            with ctx, acc.autocast():
                loss = self._loss(batch, g)
                acc.backward(loss / ga)
            total += loss.detach() / ga
        if self.cfg.optim.max_grad_norm is not None:
            acc.clip_grad_norm_(self.params, self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update()
        self.step += 1
        return float(acc.reduce(total, reduction="mean"))

    # -- the run -----------------------------------------------------------------------------------------------------

    def _prepare_output(self) -> None:
        """Main process, with output_dir's lock held: remove a killed run's leftovers, record the config, and
        refuse links planted at the names written later (now, not after hours of training)."""
        ckpt.remove_leftovers(self.output)
        atomic_write_text(self.output / "config.json", json.dumps(self.cfg.to_dict(), indent=2) + "\n")
        for name in ("metrics.jsonl", "final"):
            check_not_symlink(self.output / name, hint=_LINK_HINT)
        if self.cfg.train.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.output / "logs"))

    def resume(self) -> None:
        acc = self.accelerator
        acc.wait_for_everyone()  # the main process has removed partial checkpoints (_prepare_output)
        latest = ckpt.latest_checkpoint(self.output)
        if latest is None:
            return
        state = ckpt.load_checkpoint(acc, latest, lr_scheduler=self.lr_scheduler, ema=self.ema)
        self.step = int(state["step"])
        if state.get("world") not in (None, acc.num_processes):
            raise ValueError(f"{latest} was written by {state['world']} processes; resume it with the same number "
                             f"(now {acc.num_processes}), or start a new output_dir")
        metrics = self.output / "metrics.jsonl"
        if acc.is_main_process and metrics.is_file():
            # Steps logged after the checkpoint by the interrupted run are run again: drop their records.
            kept = [ln for ln in metrics.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
        acc.print(f"resumed from {latest} at step {self.step}")

    def run(self) -> Path:
        """Train to cfg.train.steps and export. The run owns output_dir meanwhile: a second run on it fails
        before training (dit.train.launch.exclusive_output_dir)."""
        acc = self.accelerator
        with exclusive_output_dir(self.output, acc.is_main_process, acc.device, prepare=self._prepare_output):
            return self._run()

    def _run(self) -> Path:
        from tqdm.auto import tqdm

        acc, t = self.accelerator, self.cfg.train
        self.resume()
        ga = self.cfg.optim.grad_accumulation
        batches = iter(make_loader(self.source, self.stream, self.step * ga, self.cfg.data.num_workers))
        bar = tqdm(total=t.steps, initial=self.step, desc="train", disable=not acc.is_main_process, dynamic_ncols=True)
        metrics_path = self.output / "metrics.jsonl"
        window, start = [], time.perf_counter()
        while self.step < t.steps:
            loss = self.train_step(batches)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {self.step}; lower optim.lr or check the data")
            window.append(loss)
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if acc.is_main_process:
                with open_append_nofollow(metrics_path) as fh:
                    fh.write(json.dumps({"step": self.step, "loss": loss, "lr": lr}) + "\n")
                if self.writer is not None:
                    self.writer.add_scalar("train/loss", loss, self.step)
                    self.writer.add_scalar("train/lr", lr, self.step)
            if self.step % t.log_every == 0:
                rate = len(window) / (time.perf_counter() - start)
                bar.write(f"step {self.step}: loss {sum(window) / len(window):.5f} lr {lr:.3e} {rate:.2f} steps/s")
                window, start = [], time.perf_counter()
            if self.step % t.checkpoint_every == 0 or self.step == t.steps:
                ckpt.save_checkpoint(acc, self.output, self.step, {"data_position": self.step * ga,
                                                                   "world": acc.num_processes}, t.keep_last,
                                     lr_scheduler=self.lr_scheduler, ema=self.ema)
            if t.validate_every is not None and (self.step % t.validate_every == 0 or self.step == t.steps):
                self.validate()
        bar.close()
        final = self.export()
        if self.writer is not None:
            self.writer.close()
        return final

    # -- validation and export ---------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _with_ema(self):
        """The unwrapped model with the EMA weights swapped in (the training weights come back on exit)."""
        model = self.accelerator.unwrap_model(self.model)
        saved = None
        if self.ema is not None:
            saved = [p.detach().clone() for p in self.params]
            self.ema.copy_to(self.params)
        try:
            yield model
        finally:
            if saved is not None:
                with torch.no_grad():
                    for p, s in zip(self.params, saved):
                        p.copy_(s)

    @torch.no_grad()
    def validate(self) -> None:
        """Sample into OUTPUT/validation/step-N/. The main process writes; with context parallelism the other ranks
        of its group (data-parallel rank 0) sample alongside it, since their transformer's attention needs every
        rank of the group (identical inputs and seeds on each)."""
        acc = self.accelerator
        if self._sharded():
            acc.print("validation skipped under FSDP / ZeRO-3 (not supported yet)")
            return
        if self.layout.dp_rank == 0:
            folder = _subfolder(self.output, "validation", f"step-{self.step:08d}") if acc.is_main_process else None
            with self._with_ema() as model:
                if self.trains_vae:  # no context parallelism here: the main process alone
                    self._validate_autoencoder(model.vae, folder)
                else:
                    model.eval()
                    if self.objective.needs_low_res:
                        self._validate_relay(model, folder)
                    else:
                        self._validate_prompts(model, folder)
                    model.train()
        acc.wait_for_everyone()

    def _validate_prompts(self, model, folder: Path | None) -> None:
        """The validation prompts through the family's pipeline: a video (mp4) or image (png) each, written into
        `folder` (None: a context-parallel helper rank, which samples and writes nothing)."""
        t = self.cfg.train
        pipe = self.bundle.pipeline(model)
        pipe.set_progress_bar_config(disable=True)
        h, w, f = self.source.buckets[0]
        for i, prompt in enumerate(t.validation_prompts):
            g = torch.Generator().manual_seed(t.seed + i)
            kw = dict(prompt=prompt, num_inference_steps=t.validation_steps, guidance_scale=t.validation_guidance,
                      generator=g, output_type="np")
            if self.bundle.is_video:
                media, name = pipe(height=h, width=w, num_frames=f, **kw).frames[0], f"{i:02d}.mp4"
            else:
                media, name = pipe(height=h, width=w, **kw).images[:1], f"{i:02d}.png"
            if folder is not None:
                _write_media(media, folder / name)
        if folder is not None:
            atomic_write_text(folder / "prompts.json", json.dumps(t.validation_prompts, indent=2) + "\n")

    def _validate_autoencoder(self, vae, folder: Path) -> None:
        """Reconstructions (posterior mean) of the first validation_items clips: input and output videos, and the
        PSNR of each in metrics.json."""
        n, device, psnr = min(self.cfg.train.validation_items, len(self.source)), self.accelerator.device, []
        for i in range(n):
            video = self.source[i]["video"][None].to(device)  # (1, F, 3, H, W) in [-1, 1]
            recon = vae.decode(vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mode()).sample
            recon = recon.permute(0, 2, 1, 3, 4).clamp(-1, 1)  # (1, 3, F, H, W) -> (1, F, 3, H, W)
            mse = float(((recon - video) / 2).pow(2).mean())
            psnr.append(round(10 * math.log10(1 / max(mse, 1e-12)), 3))
            for name, clip in (("input", video), ("reconstruction", recon)):
                frames = (clip[0].permute(0, 2, 3, 1).float().cpu().numpy() + 1) / 2  # (F, H, W, 3) in [0, 1]
                _write_media(frames, folder / f"{i:02d}-{name}.mp4")
        atomic_write_text(folder / "metrics.json", json.dumps({"psnr": psnr}, indent=2) + "\n")

    @torch.no_grad()
    def latent_scale(self, vae, items: int = 64) -> float:
        """1 / RMS of posterior samples over the first `items` clips (E z^2 = mean^2 + var, averaged): the
        scaling_factor that gives the diffusion model unit-RMS latents, as SD's 0.18215 was measured."""
        device, total, count = self.accelerator.device, 0.0, 0
        for i in range(min(items, len(self.source))):
            video = self.source[i]["video"][None].to(device).permute(0, 2, 1, 3, 4)  # (1, 3, F, H, W)
            dist = vae.encode(video).latent_dist
            total += float((dist.mean.pow(2) + dist.var).sum())
            count += dist.mean.numel()
        return 1.0 / math.sqrt(total / count)

    def _validate_relay(self, model, folder: Path | None) -> None:
        """The relay stage on the first validation_items clips: input (upsampled low resolution), output, target
        (written into `folder`; None: a context-parallel helper rank)."""
        import samplers
        t, b, device = self.cfg.train, self.bundle, self.accelerator.device
        n = min(t.validation_items, len(self.source))
        # With a latent cache the clips come from the source the cache was built from (item i is the same clip).
        pixels = build_source(self.cfg.data, self.cfg.train.seed, use_cache=False) if self.cfg.data.cache else self.source
        items = [pixels[i] for i in range(n)]
        ext = "mp4" if b.family == "cogvideox" else "png"
        g = torch.Generator().manual_seed(t.seed)
        o = self.cfg.objective
        spec = samplers.relay_spec(self.objective.path, o.relay_t, min(t.validation_steps, o.relay_t),
                                   self.objective.prediction, block_size=o.block_size, noise_alpha=o.noise_alpha)
        for i, item in enumerate(items):
            video = item["video"][None].to(device)  # (1, F, 3, H, W)
            low = low_resolution(video, o.scale_factor)
            z_low = b.encode_posterior(low)[0]
            cond = b.encode_text([item["caption"]], device)

            def model_fn(x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
                ts = torch.as_tensor(ts, device=device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
                return b.forward(model, x, ts, cond).float()

            z = denoise(model_fn, z_low, spec, generator=g)
            if folder is None:  # a context-parallel helper rank: it sampled with the main process
                continue
            for name, clip in (("input", low), ("relay", self._decode(z)), ("target", video)):
                frames = ((clip[0].permute(0, 2, 3, 1).float().cpu().numpy() + 1) / 2)  # (F, H, W, 3) in [0, 1]
                _write_media(frames if ext == "mp4" else frames[:1], folder / f"{i:02d}-{name}.{ext}")
        if folder is not None:
            atomic_write_text(folder / "captions.json", json.dumps([it["caption"] for it in items], indent=2) + "\n")

    @torch.no_grad()
    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents in the transformer's layout -> (B, F, 3, H, W) in [-1, 1]."""
        cfg = self.bundle.vae.config
        if self.bundle.family == "cogvideox":
            video = self.bundle.vae.decode(z.permute(0, 2, 1, 3, 4) / cfg.scaling_factor).sample  # (B, 3, F, H, W)
            return video.permute(0, 2, 1, 3, 4).clamp(-1, 1)
        image = self.bundle.vae.decode(z / cfg.scaling_factor + (cfg.shift_factor or 0.0)).sample  # (B, 3, H, W)
        return image[:, None].clamp(-1, 1)

    def export(self) -> Path:
        """OUTPUT/final/: `pipeline/` (full fine-tune: a diffusers pipeline folder), `lora/` (LoRA weights that
        diffusers' load_lora_weights reads) or `vae/` (an autoencoder run, with its measured scaling_factor), from
        the EMA weights when EMA is on. Written into a private temporary folder and renamed (dit.outputs)."""
        acc = self.accelerator
        final = self.output / "final"
        if self._sharded():
            # The unwrapped module holds only this rank's shards; a full-state gather for export is not written yet.
            acc.print("final export skipped under FSDP / ZeRO-3 (not supported yet): the last checkpoint holds the "
                      "sharded state")
            return self.output / "checkpoints"
        if acc.is_main_process:
            with self._with_ema() as model:
                atomic_write(final, lambda tmp: self._write_export(model, tmp))
        acc.wait_for_everyone()
        return final

    def _write_export(self, model, tmp: Path) -> None:
        if self.trains_vae:
            model.vae.register_to_config(scaling_factor=self.latent_scale(model.vae))
            model.vae.save_pretrained(tmp / "vae", safe_serialization=True)
        elif self.cfg.model.lora is not None:
            save_lora(model, self.bundle.family, tmp / "lora")
        elif self.cfg.train.save_pipeline:
            self.bundle.pipeline(model).save_pretrained(tmp / "pipeline")
        tmp.mkdir(parents=True, exist_ok=True)
        # Inside atomic_write's private folder (mode 0700, fresh name): nothing can be planted there.
        (tmp / "trainer_state.json").write_text(json.dumps({"step": self.step, "ema": self.ema is not None}) + "\n")


def save_lora(transformer, family: str, folder: Path) -> None:
    """The adapter as diffusers writes it: pytorch_lora_weights.safetensors, keys "transformer.<module>.lora_A.weight"
    (the family's diffusers pipeline reads it with load_lora_weights)."""
    from peft.utils import get_peft_model_state_dict

    layers = get_peft_model_state_dict(transformer)
    if family == "cogvideox":
        from diffusers import CogVideoXPipeline as Pipe
    elif family == "wan":
        from diffusers import WanPipeline as Pipe
    else:
        from diffusers import StableDiffusion3Pipeline as Pipe
    Pipe.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)


def _write_media(frames, path: Path) -> None:
    """frames (F, H, W, 3) in [0, 1] -> an mp4, or a png of the first frame; renamed into place, so a link planted
    at `path` is refused rather than written through (dit.outputs)."""
    if path.suffix == ".png":
        import imageio.v3 as iio

        data = (np.clip(frames, 0, 1) * 255).round().astype("uint8")
        atomic_write(path, lambda tmp: iio.imwrite(tmp, data[0]))
    else:
        write_video(frames, path, fps=8)


_LINK_HINT = "; dit train does not write through links in output_dir: remove it"


def _subfolder(root: Path, *names: str) -> Path:
    """root/names..., created as needed; a link on the way is refused (our writes would land outside root)."""
    path = root
    for name in names:
        path = path / name
        check_not_symlink(path, hint=_LINK_HINT)
        path.mkdir(exist_ok=True)
    return path


def train(cfg: TrainConfig) -> Path:
    """Build the trainer and run it to cfg.train.steps (resuming from the latest checkpoint in output_dir)."""
    return Trainer(cfg).run()
