"""TPGM's DomainNet recipe: ResNet-50 fine-tuned on real, OOD sketch / painting / clipart /
infograph.

SGD (momentum 0.9, Nesterov, weight decay 5e-4) with a cosine schedule, and
TPGM with a radius update at every step (``proj_freq=1``, ``max_iters=1``,
MARS norms), as in Tian et al., CVPR 2023. Needs data and weights prepared
beforehand:

* TFDS ``domainnet`` in array_record format in ``--config.data.data_dir``
  (see experiments/data/pipeline.py: DatasetNotPreparedError says how);
* the pre-trained CLIP ResNet-50 image tower, converted from the open_clip /
  OpenAI safetensors file: ``python -m experiments.convert --format clip_resnet
  --input open_clip_model.safetensors --output DIR``, then
  ``--config.pretrain.checkpoint=DIR``. A fresh head is trained on top of the
  1024-d CLIP embedding; inputs are normalised with CLIP's mean and std.

For timm's ImageNet ResNet-50 instead (``--format timm_resnet``), pass
``--config.model.name=timm_resnet50`` and ImageNet's normalisation,
``--config.model.input_mean=0.485,0.456,0.406
--config.model.input_std=0.229,0.224,0.225``.
"""

from ml_collections import ConfigDict

from experiments.configs import default


def get_config() -> ConfigDict:
  c = default.get_config()
  c.name = "domainnet_resnet50"
  c.data.task = "domainnet"
  c.data.task_kwargs = ConfigDict(
    dict(id_domain="real", ood_domains=("sketch", "painting", "clipart", "infograph"))
  )
  # The reference recipes' augmentation: RandomResizedCrop (scale 0.08-1) + flip; eval:
  # resize to 256, central 224 crop.
  c.data.hflip = True
  c.data.random_resized_crop = True
  c.data.crop_fraction = 0.875
  c.data.eval_batch_size = 256
  c.model.name = "clip_resnet50"
  c.model.overrides = ConfigDict()
  # The input normalisation the pre-trained weights expect (CLIP's, experiments.models.convert).
  c.model.input_mean = (0.48145466, 0.4578275, 0.40821073)
  c.model.input_std = (0.26862954, 0.26130258, 0.27577711)
  c.pretrain.checkpoint = ""  # required: the converted ResNet-50 (see the module doc)

  c.train.steps = 30_000  # ~50 epochs of DomainNet real at batch 256
  c.train.batch_size = 256
  c.train.optimizer = ConfigDict(
    dict(
      name="sgd",
      lr=1e-2,
      momentum=0.9,
      nesterov=True,
      weight_decay=5e-4,
      schedule="cosine",
      warmup_steps=0,
    )
  )
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.lp.train.optimizer.lr = 1e-1

  c.tpgm = ConfigDict(dict(norm="mars", proj_freq=1, max_iters=1, lr=1e-2))
  c.methods = ("ft", "lp", "wise_ft", "tpgm")
  return c
