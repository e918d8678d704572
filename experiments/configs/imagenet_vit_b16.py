"""The ImageNet recipe with post-hoc TPGM: ViT-B/16 fine-tuned with AdamW, radii learned afterwards.

Fine-tune normally, then learn per-layer radii between the fine-tuned and the
pre-trained weights on the held-out split (carved from ImageNet train,
disjoint from the validation split) and project once: a learned WiSE-FT.
OOD: ImageNet-V2, -Sketch, -A, -R. Needs data and weights prepared
beforehand:

* TFDS ``imagenet2012``, ``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a``,
  ``imagenet_r`` in array_record format in ``--config.data.data_dir``;
* the pre-trained CLIP ViT-B/16 image tower, converted from the Hugging Face
  ``openai/clip-vit-base-patch16`` safetensors file: ``python -m
  experiments.models.convert --format clip_vit --input model.safetensors --output DIR``,
  then ``--config.pretrain.checkpoint=DIR``;
* the zero-shot head: CLIP's text embeddings of the 1000 ImageNet classes as a
  ``(1000, 512)`` ``.npy`` file (row i: class i of TFDS ``imagenet2012``),
  ``--config.model.overrides.zero_shot_head=FILE``. As in WiSE-FT, the head
  starts as the zero-shot classifier (``logit_scale * normalised features @
  normalised text embeddings.T``, ``experiments.models.zero_shot_kernel``), so
  FT, WiSE-FT and post-hoc TPGM start from, interpolate towards and project
  onto the zero-shot model: the head is constrained with the backbone. To
  train a fresh head instead, leave ``zero_shot_head`` empty and pass
  ``--config.train.constrained=backbone``.
"""

from ml_collections import ConfigDict

from experiments.configs import default


def get_config() -> ConfigDict:
  c = default.get_config()
  c.name = "imagenet_vit_b16"
  c.data.task = "imagenet"
  c.data.task_kwargs = ConfigDict()
  # The reference recipes' augmentation: RandomResizedCrop (scale 0.08-1) + flip; eval:
  # resize to 256, central 224 crop.
  c.data.hflip = True
  c.data.random_resized_crop = True
  c.data.crop_fraction = 0.875
  c.data.eval_batch_size = 256
  c.model.name = "clip_vit_b16"
  # zero_shot_head: required, the (1000, 512) .npy of class text embeddings (module doc);
  # logit_scale: CLIP's temperature (100 for the OpenAI models).
  c.model.overrides = ConfigDict(dict(zero_shot_head="", logit_scale=100.0))
  # The input normalisation the pre-trained weights expect (CLIP's, experiments.models.convert).
  c.model.input_mean = (0.48145466, 0.4578275, 0.40821073)
  c.model.input_std = (0.26862954, 0.26130258, 0.27577711)
  c.pretrain.checkpoint = ""  # required: the converted ViT-B/16 (see the module doc)

  c.train.steps = 25_000  # 10 epochs at batch 512
  c.train.batch_size = 512
  c.train.optimizer = ConfigDict(
    dict(name="adamw", lr=3e-5, weight_decay=0.1, schedule="cosine", warmup_steps=500)
  )
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.constrained = ("backbone", "head")  # the zero-shot head is pre-trained too
  c.lp.train.optimizer = ConfigDict(
    dict(name="adamw", lr=1e-3, weight_decay=0.0, schedule="cosine", warmup_steps=0)
  )

  # FT starts from the zero-shot head, so WiSE-FT and post-hoc TPGM go from the zero-shot
  # model (base "") to FT, head included; post hoc with the paper's ViT settings.
  c.wise_ft = ConfigDict(dict(source="ft", base="", alphas=(0.5,)))
  c.tpgm_post_hoc = ConfigDict(
    dict(source="ft", base="", norm="l2", steps=200, lr=1e-2, batch_size=256)
  )
  c.methods = ("ft", "lp", "wise_ft", "tpgm_post_hoc")
  return c
