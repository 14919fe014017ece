r"""The seed study's setup, with its two errors fixed, at half its width.

FLAIR only, every subject resized to 128x128 in-plane, the seed's 3-D U-Net ((3,3,1)
kernels in the first two levels, (3,3,3) below and in the bottleneck), no
normalisation, affine augmentation. Fixed: the split is by subject (no
augmented copy of a validation subject is trained on) and label 2 ("other
pathology") is ignored by loss and metrics instead of counted as lesion. Changed
(measurements in docs/results.md): soft Dice + BCE instead of soft Dice
alone; along Z each scan's own slices (16 to 24, ``data.grid_max_depth``) instead of
16 for every scan, and 64x64 training crops of every slice instead of whole volumes;
half the seed's filters (16->32 ... the 128->256 bottleneck instead of 32->64 ...
256->512: a quarter of the work a step), so that in the same time on a 2-core
CPU it trains 900 steps on 96 subjects instead of 280 on 48. The seed's network
is ``SEED_NETWORK`` (configs/seed_width.py trains it); its exact loss is
``--config.loss.name=dice``; whole volumes are ``--config.train.patch_size=None``.

Main job (generates the synthetic data when missing, trains, evaluates):

  python launch.py --config=configs/default.py --workdir=runs/default

On a real challenge download placed by hand: configs/challenge.py.
"""

import ml_collections

# The seed study's filters (9,286,017 parameters with one output).
SEED_NETWORK = {'encoder_filters': ((32, 64), (64, 128), (128, 256)),
                'bottleneck_filters': (256, 512),
                'decoder_filters': (32, 64, 128)}


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.distributed = False                 # multi-host (README)
  c.keep_freed_memory = True            # wmh_jax/host_memory.py
  c.xla_cpu_onednn = False              # oneDNN for XLA:CPU's products (x86-64;
                                        # wmh_jax/xla_flags.py): a faster step, but it
                                        # can hang a run for good (a nested-parallel
                                        # deadlock in XLA's oneDNN thread pool: stop 40,
                                        # docs/results.md); opt in only where a hang
                                        # costs little

  c.data = ml_collections.ConfigDict()
  c.data.root = 'data/synthetic'        # challenge layout: SITE/ID/pre/FLAIR.nii.gz
  c.data.synthetic = True               # generate data.root (and val_root) when missing
  c.data.num_subjects = 96              # synthetic training subjects
  c.data.synthetic_seed = 2017
  c.data.val_root = 'data/synthetic_val'  # '' : split data.root by subject instead
  c.data.num_val_subjects = 12          # synthetic validation subjects (their own seed)
  c.data.val_synthetic_seed = 2018
  c.data.test_root = 'data/synthetic_test'  # reported in WORKDIR/eval_test; '' : none
  c.data.num_test_subjects = 12
  c.data.test_synthetic_seed = 2019
  c.data.grid = (128, 128, 16)          # (X, Y, Z) after canonical (RAS) reorientation
  c.data.grid_max_depth = 24            # each scan keeps its own slices along Z, rounded
                                        # up to 4, from grid's Z up to this
                                        # (subjects.scan_grid; docs/results.md, stop 36);
                                        # 0: every scan on grid (before stop 36)
  c.data.split_seed = 0                 # without val_root: hash seed of the subject split
  c.data.val_fraction = 0.2             # without val_root: share held out (about, per site)
  c.data.test_fraction = 0.0            # share of data.root held out as test (by the hash)
  c.data.val_sites = ()                 # without val_root: leave these sites out instead
  c.data.val_ids = ()                   # without val_root: hold out these (ID or SITE/ID)
  c.data.tfds = ''                      # TFDS: wmh_synthetic | wmh_challenge
  c.data.tfds_dir = 'data/tfds'
  c.data.shuffle_buffer = 64
  c.data.pipeline_threads = 0           # tf.data's own threads (one op each); 0: TF's
                                        # default (a thread a core): the same batches
  c.data.input_norm = 'brain'           # U-Net input z-scored in: head (one pass) | brain
                                        # (trained on both; the lesion from a second pass
                                        # on the scan z-scored in the brain the first
                                        # found: docs/results.md, stop 25)
  c.data.brain_norm_fraction = 0.5      # input_norm='brain': share of training crops
                                        # z-scored in the brain (the rest in the head)
  c.data.max_voxels = 0                 # most voxels a NIfTI header may declare; 0: 512^3
  c.data.missing_mask = 'skip'          # subjects without wmh.nii.gz: skip with a warning

  c.augment = ml_collections.ConfigDict()
  c.augment.enabled = True
  c.augment.rotate_deg = (5.0, 5.0, 15.0)   # max rotation about X, Y, Z (physical space)
  c.augment.scale = 0.1                     # isotropic scale in [1 - s, 1 + s]
  c.augment.shear = 0.05
  c.augment.translate_vox = (8.0, 8.0, 1.0)
  c.augment.flip_lr = True
  c.augment.intensity = 0.25                # x * U(1-a, 1+a) + U(-a, a) on z-scores
  c.augment.bias_field = 0.0                # exp(degree-2 polynomial), coefficients U(-a, a)
  c.augment.gamma = 0.0                     # contrast: range ** exp(N(0, gamma))
  c.augment.noise = 0.0                     # Gaussian noise, sd U(0, noise) in z-score units

  c.model = ml_collections.ConfigDict()
  c.model.encoder_filters = ((16, 32), (32, 64), (64, 128))  # half of SEED_NETWORK's
  c.model.kernel_sizes = ((3, 3, 1), (3, 3, 1), (3, 3, 3))
  c.model.pool_sizes = ((2, 2, 1), (2, 2, 1), (2, 2, 2))
  c.model.bottleneck_filters = (128, 256)
  c.model.bottleneck_kernel = (3, 3, 3)
  c.model.decoder_filters = (16, 32, 64)
  c.model.norm = 'none'                 # none | batch | group | instance
  c.model.upsampling = 'nearest'        # nearest | linear
  c.model.conv_impl = 'auto'            # native | fold2d | winograd | auto (convs.py)
  c.model.output_bias = -4.0            # initial lesion logit: p = sigmoid(-4) = 0.02
  c.model.brain_output = True           # 2nd output: learnt brain mask (ID/brain.nii.gz)
  c.model.dtype = 'float32'             # compute dtype; params stay float32

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'dice_bce'              # dice (the seed's) | dice_bce
  c.loss.smooth = 1.0
  c.loss.bce_weight = 1.0
  c.loss.pos_weight = 1.0               # BCE: a lesion voxel's weight against background's
  c.loss.small_lesion_weight = 0.0      # BCE: a small lesion's voxels weigh up to 1 + this
  c.loss.small_lesion_mass = 4.0        # ... below this lesion mass (grid voxels) around
                                        # them (losses.lesion_mass; docs/results.md)
  c.loss.soft_targets = True            # targets: lesion fraction of each grid voxel
  c.loss.brain_weight = 0.1             # weight of the brain channel's loss

  c.train = ml_collections.ConfigDict()
  c.train.init_from = ''                # workdir whose weights start this run
  c.train.batch_size = 1
  c.train.patch_size = (64, 64, None)   # training crops of a subject's grid (None along
                                        # an axis: all of it, here every slice); None:
                                        # whole volumes
  c.train.lesion_patch_fraction = 0.8   # share of crops centred on a lesion
  c.train.num_steps = 900
  c.train.learning_rate = 1e-3          # 3e-4 before stop 20 (docs/results.md)
  c.train.warmup_steps = 30
  c.train.end_learning_rate_fraction = 0.05  # cosine decays to lr * this
  c.train.weight_decay = 0.0
  c.train.grad_clip_norm = 1.0
  c.train.log_every_steps = 10
  c.train.eval_every_steps = 300
  c.train.checkpoint_every_steps = 100
  c.train.max_checkpoints = 2

  # Native-resolution refinement (wmh_jax/refine.py): per-voxel MLPs re-decide
  # every native voxel the U-Net gives >= candidate.
  c.refine = ml_collections.ConfigDict()
  c.refine.enabled = True
  c.refine.num_subjects = 36            # training subjects the MLPs are fitted on
  c.refine.candidate = 2e-4             # U-Net probability a voxel needs to be re-decided
                                        # (2e-4: ~10 % of the brain; docs/results.md)
  c.refine.hidden = (16, 16)            # MLP hidden widths
  c.refine.num_fits = 3                 # MLPs (seeds) whose probabilities are averaged
  c.refine.bag_subjects = True          # each MLP on its own 12 of the 36 (one pick
                                        # of 12 moved MS3SEG Dice 0.49-0.63; docs/results.md)
  c.refine.num_steps = 1500
  c.refine.batch_size = 8192
  c.refine.learning_rate = 1e-2
  c.refine.thresholds = tuple(round(0.2 + 0.05 * i, 2) for i in range(11))  # 0.2 ... 0.7
  c.refine.threshold_rule = 'one_se'    # the highest threshold within one standard error
                                        # of the best Dice on the fitting subjects
                                        # (refine.pick; 'best': the best; docs/results.md)
  c.refine.min_lesion_mm3 = (0.0, 10.0, 20.0, 30.0)  # smaller lesions dropped: chosen
                                        # on the fitting subjects by min_lesion_rule
  c.refine.min_lesion_mm2 = (0.0, 2.0, 3.0, 4.0, 5.0)  # then, at that volume,
                                        # lesions whose largest cross-section on a
                                        # slice (across the coarsest axis) is smaller
                                        # dropped: chosen by the same rule (2-3 voxel
                                        # specks on thick slices; docs/results.md)
  c.refine.min_lesion_rule = 'one_se'   # the largest within one standard error of the
                                        # best mean of Dice and lesion F1 there
                                        # (refine.pick; 'best': the best; docs/results.md)
  c.refine.prior_weight = 0.0           # with train.init_from: that run's refiner's share of
                                        # the refined probability (configs/finetune.py)

  c.evaluate = ml_collections.ConfigDict()
  c.evaluate.num_images = 4             # overlay PNGs written by evaluate

  c.predict = ml_collections.ConfigDict()
  c.predict.threshold = 0.5             # U-Net probability -> lesion, without the
                                        # refiner (predict, evaluate, validation Dice)
  c.predict.tta = False                 # average over flips along tta_axes
  c.predict.tta_axes = (0,)             # grid axes: 0 is left-right
  c.predict.ensemble = ()               # more workdirs (same model config) to average
  c.predict.save_probabilities = False  # also write NAME_prob.nii.gz (float32)
  c.predict.overlays = True             # NAME_overlay.png: axial slices, masks outlined
  c.predict.activations = False         # NAME_activations.png: every conv layer's maps
  c.predict.brain_threshold = 0.5       # brain probability -> native brain mask
  c.predict.mask_to_brain = True        # no lesion outside the brain mask (evaluate too)
  c.predict.save_brain = True           # NAME_brain.nii.gz (uint8), with a brain output
  c.predict.workers = 2                 # scans segmented at once, on threads (predict,
                                        # evaluate, the refiner's fitting subjects): the
                                        # same masks in less time (docs/results.md, stop
                                        # 41); 1: one after another

  # --mode=benchmark: whole data.grid volumes, random inputs.
  c.benchmark = ml_collections.ConfigDict()
  c.benchmark.conv_impls = ('auto',)    # any of native, fold2d, winograd, auto
  c.benchmark.batch_sizes = (1,)
  c.benchmark.dtype = 'float32'         # compute dtype: float32 | bfloat16
  c.benchmark.warmup = 2
  c.benchmark.steps = 10                # timed train steps a setting
  c.benchmark.pipeline = True           # also time tf.data alone
  return c
