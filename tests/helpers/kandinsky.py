"""The tiny Kandinsky 2.2 model saved as the hub's two repositories: prior and decoder folders."""

from pathlib import Path

from diffusers import DDPMScheduler, KandinskyV22Pipeline, KandinskyV22PriorPipeline

from lightning_modules.families.kandinsky import KandinskyParts, build_tiny_kandinsky


def save_tiny_kandinsky(root: Path) -> KandinskyParts:
    """Writes `root/prior` and `root/decoder` (read back through `from_pretrained`); returns the
    parts they were saved from."""
    tiny = build_tiny_kandinsky()
    KandinskyV22PriorPipeline(
        prior=tiny.prior,
        image_encoder=tiny.image_encoder,
        text_encoder=tiny.text_encoder,
        tokenizer=tiny.tokenizer,
        scheduler=tiny.prior_scheduler,
        image_processor=tiny.image_processor,
    ).save_pretrained(root / "prior")
    scheduler = DDPMScheduler.from_config(tiny.sampler_config)
    decoder = KandinskyV22Pipeline(unet=tiny.unet, scheduler=scheduler, movq=tiny.movq)
    decoder.save_pretrained(root / "decoder")
    return tiny
