"""The shared config skeleton; one file per dataset fills in its numbers.

Sections: data, model, optim (backbone pretraining), enrich, align, meta,
warmup, one section per baseline, and the seeds.  Every field has a one-line
comment; override any of them from the command line, e.g.
``--config.meta.inner_steps=3``.
"""

import ml_collections


def base_config(dataset: str, n_max: int, k: int) -> ml_collections.ConfigDict:
  """Defaults shared by every dataset."""
  c = ml_collections.ConfigDict()
  c.method = "emerflow"           # base|dropoutnet|metaemb|mwuf|cvar|emerflow|emerflow_no_*
  c.backbone = "deepfm"           # deepfm|widedeep|fm|dcn
  c.seeds = 3                     # number of seeds (runs seed, seed+1, ...)
  c.seed = 0                      # first seed

  c.data = ml_collections.ConfigDict()
  c.data.name = dataset           # registry name in emerflow_jax.data.READERS
  c.data.dir = ""                 # data directory ("" -> $EMERFLOW_DATA_DIR -> user cache)
  c.data.download = True          # download MovieLens when missing (checksum verified)
  c.data.options = ml_collections.ConfigDict()  # reader keyword arguments
  c.data.n_max = n_max            # N: old items have more than N rows
  c.data.k = k                    # K: rows per warm phase
  c.data.val_fraction = 0.1       # old items held out as validation "emerging" items
  c.data.val_pick = "random"      # which old items: random | fewest_rows (just over N rows, the most like emerging items)

  c.model = ml_collections.ConfigDict()
  c.model.dim = 16                # embedding dimension d
  c.model.mlp = (16, 16)          # deep-part hidden sizes
  c.model.cross_layers = 2        # DCN cross layers

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-3               # Adam learning rate for backbone pretraining
  c.optim.batch_size = 256        # pretraining minibatch
  c.optim.epochs = 10             # pretraining epochs over old-item rows
  c.optim.weight_decay = 0.0      # AdamW decay (0 -> plain Adam)
  c.optim.ckpt_every_s = 30.0      # checkpoint pretraining at most this often (s of training) and after the last epoch
  c.optim.cache_dir = ""          # share pretrained backbones across runs ("" -> <workdir>/backbones)

  c.enrich = ml_collections.ConfigDict()
  c.enrich.source = "llm"         # llm|agent4rec|galkars|raw|dataset (synthetic); "a+b" concatenates sources, e.g. llm+raw
  c.enrich.encoder = "minilm"     # sentence encoder name or local path
  c.enrich.cache_dir = ""         # cached vectors ("" -> user cache)

  c.generate = ml_collections.ConfigDict()  # stage 1 offline (experiments.enrich); no run reads it
  c.generate.llm = "smollm2"      # local LM: smollm2 (SmolLM2-135M-Instruct GGUF), a .gguf or an HF folder
  c.generate.threads = 1          # torch threads
  c.generate.device = "cpu"       # torch device of the LM (cuda on a GPU)
  c.generate.batch_size = 16      # answers per generate call
  c.generate.max_new_tokens = 96  # tokens per answer

  c.align = ml_collections.ConfigDict()
  c.align.hidden = (64,)          # mlp: mapper g_phi hidden sizes
  c.align.use_fields = False      # also feed the frozen backbone's item-field embeddings (off: chosen on validation)
  c.align.lam = 0.1               # mlp: weight of the BCE term (the MSE term is variance-normalised)
  c.align.steps = 1000            # mlp: alignment training steps
  c.align.lr = 1e-3               # mlp: Adam learning rate
  c.align.batch_rows = 1024       # mlp: old-item rows per BCE minibatch
  c.align.weight_decay = 1e-4     # mlp: AdamW decay of the mapper
  c.align.holdout = 0.2           # mlp: old items held out of the MSE term for early stopping
  c.align.kind = "lowrank"        # mlp (g_phi, the mlp: options above) | ridge | lowrank (reduced-rank ridge) | knn (text neighbours); lowrank: validation AUC at cold, ML-100K and repoDB
  c.align.shrink = "none"         # prior toward the old-item mean: none | global (one factor) | gate (per item); closed-form kinds (validation could not separate them)
  c.align.folds = 5               # closed forms: k-fold CV over old items (closed forms' hyperparameters, the prior)
  c.align.ridge_lambda = 0.0      # ridge|lowrank: penalty (0 -> chosen by CV)
  c.align.rank = 0                # lowrank: rank (0 -> chosen by CV)
  c.align.knn_k = 0               # knn: neighbours (0 -> chosen by CV)
  c.align.knn_temperature = 0.0   # knn: softmax temperature on cosine similarity (0 -> chosen by CV)
  c.align.diagnose = False        # closed forms: log held-out FVU and cold AUC on old items (nested CV; slower)

  c.meta = ml_collections.ConfigDict()
  c.meta.tasks = "flow"           # flow (replay warm phases a,b,c, score later rows) | chunks (chunk j -> j+1)
  c.meta.task_offset = "first"    # flow tasks start at the item's first row | random (anywhere in its history)
  c.meta.phase_alpha = True       # one step size per warm phase (needs flow tasks)
  c.meta.inner_rule = "adam"      # sgd (e - alpha*g) | adam (alpha * Adam direction)
  c.meta.inner_steps = 10         # T inner gradient steps (= warmup.steps: starts as the fine-tuning)
  c.meta.alpha = 1e-2             # initial inner step size (= warmup.lr for the adam rule)
  c.meta.alpha_mode = "scalar"    # scalar|per_dim (Meta-SGD; a learned rule moves to another backbone only as a scalar)
  c.meta.learn_alpha = True       # learn alpha (in log space) in the outer loop
  c.meta.learn_shrink = False     # learn s in e0 = mean + s * (g_phi(r) - mean) (off: validation AUC lower on both backbones)
  c.meta.cold_in_outer = False    # flow tasks also score e0 on the query (the cold phase; only matters with learn_shrink)
  c.meta.train_init = False       # outer loss also trains the cold map (phi / e0)
  c.meta.crossfit_folds = 1       # >1: meta-tasks start from out-of-fold mapper outputs (only with rule_holdout = holdout_fraction = 0)
  c.meta.holdout_fraction = 0.0   # old items kept out of pretraining, used only as meta-tasks
  c.meta.rule_holdout = 0.3       # old items kept out of an auxiliary backbone; the rule is learned on them (0 = off)
  c.meta.rule_pick = "fewest_rows"  # which: fewest_rows (most like emerging items) | random
  c.meta.rule_epochs = 0          # pretraining epochs of that auxiliary backbone (0 -> optim.epochs)
  c.meta.first_order = False      # first-order (stop-gradient through inner grads)
  c.meta.outer_loss = "auc"       # query term: auc (pooled pairwise, as the protocol's pooled AUC) | bce
  c.meta.auc_pairs = 16           # auc: m > 0 sampled partners per row (unbiased, ~linear; ML-100K val AUC = every pair's, 3 seeds) | 0 = every pair (quadratic)
  c.meta.beta = 0.1               # outer loss = beta * L(support; e0) + (1-beta) * L(query; e_T)
  c.meta.epochs = 50              # passes over all meta-training tasks (ML-100K DeepFM, 3 seeds: mean val AUC .7351/.7350 at 50 vs 100, half the time)
  c.meta.batch_tasks = 64         # tasks per meta step
  c.meta.lr = 1e-3                # outer Adam learning rate
  c.meta.ckpt_every_s = 30.0      # checkpoint meta-training at most this often (s of training); a shorter stage is recomputed on resume
  c.meta.alpha_lr = 1e-2          # outer Adam learning rate of log alpha (0 -> meta.lr)
  c.meta.support_rows = k         # chunk tasks: padded support width (K mimics a warm phase)
  c.meta.query_rows = 4 * k       # padded query width (flow: sampled from the rows after the phases)

  c.regen = ml_collections.ConfigDict()  # EmerFlow: content regeneration after each phase (posterior.py)
  c.regen.keep_a = 1.0            # share of the adapted embedding kept after warm_a (1 = off)
  c.regen.keep_b = 1.0            # ... after warm_b
  c.regen.keep_c = 1.0            # ... after warm_c
  c.regen.keep_cv = (0.25, 0.5, 0.75)  # shares < 1 tried per phase by row-fold CV on the new items' own phase rows against 1, no regeneration (posterior.choose_keep; () = off, then keep_* apply and are tuned)
  c.regen.keep_folds = 3          # row folds per item of that CV
  c.regen.lam = 0.0               # ridge penalty (0 -> chosen by leave-one-out error on old items)
  c.regen.pool_steps = 20         # before each phase's own steps: Adam steps of one correction shared by all new items, fit on their pooled rows (0 = off; on validation items CV over items rejects it, so validation AUC is unchanged)
  c.regen.pool_lr = 1e-2          # its Adam learning rate
  c.regen.pool_lam = 0.0          # its ridge penalty on the shift and the prior's re-weighing (0 -> CV over items; no correction unless it wins)
  c.regen.pool_folds = 5          # folds over items of that CV
  c.regen.pool_prior = True       # the correction also re-weighs the aligned cold embedding (False: a shift only)
  c.regen.step_scales = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # factors of the learned step size tried on the new items' own phase rows (row-fold CV; kept only if clearly better than 1; () = off)
  c.regen.forward_phases = "bc"    # warm phases (letters of b, c) whose factor is chosen instead by replaying the previous phase on the current one's rows (rule.choose_step_scale_forward; "" = off; validation AUC unchanged on ML-100K, repoDB, clinical trials)
  c.regen.scale_folds = 3         # row folds per item of that CV
  c.regen.scale_phases = "a"       # warm phases that run it (letters of a, b, c): validation AUC rose at warm_a and fell at warm_b, warm_c with "abc" (5 datasets, 10 splits)

  c.warmup = ml_collections.ConfigDict()
  c.warmup.steps = 10             # shared fine-tuning: Adam steps per phase
  c.warmup.lr = 1e-2              # shared fine-tuning: Adam learning rate
  c.warmup.rule = "meta"          # EmerFlow's phase rule: meta (learned adapt) | finetune

  c.eval = ml_collections.ConfigDict()
  c.eval.test = True              # False: only the validation holdout is scored; emerging items' rows are never read (tuning)
  c.eval.curves = True            # TensorBoard curves under <workdir>/seed_<s>/tb (clu metric writers)

  c.dropoutnet = ml_collections.ConfigDict()
  c.dropoutnet.rate = 0.02        # share of pretraining batches with the mean item embedding (CVAR code 0.1; ML-100K val)

  c.metaemb = ml_collections.ConfigDict()
  c.metaemb.epochs = 10           # meta-training epochs of the generator
  c.metaemb.lr = 1e-3             # generator Adam learning rate
  c.metaemb.inner_lr = 1e-3       # the one inner step's learning rate
  c.metaemb.alpha = 0.1           # loss = alpha * L_a + (1 - alpha) * L_b
  c.metaemb.hidden = 16           # generator hidden width (Linear-ReLU-Linear, as in CVAR's MetaE)
  c.metaemb.batch_tasks = 64      # old-item tasks per meta step
  c.metaemb.support_rows = k      # padded width of batch a (K mimics a warm phase)
  c.metaemb.query_rows = 2 * k    # padded width of batch b

  c.mwuf = ml_collections.ConfigDict()
  c.mwuf.epochs = 10              # meta scaling/shifting networks' training epochs
  c.mwuf.lr = 1e-3                # their Adam learning rate
  c.mwuf.hidden = 16              # hidden width of both meta networks
  c.mwuf.batch_size = 256         # old-item rows per training step
  c.mwuf.cold_users = "mean"      # shift input before any row is seen: mean (all users' mean) | zero

  c.cvar = ml_collections.ConfigDict()
  c.cvar.epochs = 1               # CVAE epochs over old-item rows (1 x iters steps per batch, as in CVAR)
  c.cvar.lr = 1e-3                # CVAE Adam learning rate
  c.cvar.latent_dim = 16          # latent z dimension
  c.cvar.wass_weight = 1e-4       # weight of the batch-summed Wasserstein term (1e-4 as in CVAR)
  c.cvar.recon_weight = 1.0       # weight of the reconstruction term
  c.cvar.iters = 10               # Adam steps per minibatch (CVAR's cvar_iters)
  c.cvar.batch_size = 256         # rows per CVAE minibatch
  c.cvar.warm_epochs = 1          # CVAE epochs over each warm phase's rows (CVAR's cvar_epochs)
  c.cvar.noise = 1e-4             # scale of the latent sample noise (1e-4 as in CVAR)
  c.cvar.own_id = True            # CVAE's own trainable item-ID input table (zeros for new items)
  c.cvar.keep = 0.8               # after a phase: keep * fine-tuned + (1-keep) * decoded (CVAR code 0; ML-100K val)

  c.emerg = ml_collections.ConfigDict()  # EmerG (needs backbone=emerg_gnn); defaults: its ML-1M settings
  c.emerg.epochs = 11             # meta-training epochs over old-item tasks (melu_epochs)
  c.emerg.lr = 1e-3               # hypernetwork Adam learning rate (meta_lr)
  c.emerg.inner_lr = 1e-2         # inner SGD step on (ID embedding, graphs) (lr_inner)
  c.emerg.beta = 0.1              # loss = beta * L(support) + (1 - beta) * L(query)
  c.emerg.first_order = False     # stop the gradient at the inner step (the reference's .data update)
  c.emerg.batch_tasks = 32        # old-item tasks per meta step
  c.emerg.support_rows = k        # padded support width (K mimics a warm phase)
  c.emerg.query_rows = 2 * k      # padded query width
  c.emerg.warm_lr = 1e-2          # per-phase Adam on ID embedding + graphs (warm_lr)
  c.emerg.warm_steps = 12         # Adam steps per phase (epoch + 1 with epoch = 11)
  c.emerg.weight_decay = 2.9e-7   # L2 of the per-phase Adam (its weight_decay)

  c.gme = ml_collections.ConfigDict()  # GME-A (graph meta embeddings)
  c.gme.neighbours = 10           # old items sharing attributes with the item, most shared first
  c.gme.hidden = 16               # generator hidden width (Linear-ReLU-Linear)
  c.gme.epochs = 10               # meta-training epochs of the generator
  c.gme.lr = 1e-3                 # generator Adam learning rate
  c.gme.inner_lr = 1e-3           # the one inner step's learning rate
  c.gme.alpha = 0.1               # loss = alpha * L_a + (1 - alpha) * L_b (as MetaEmb)
  c.gme.batch_tasks = 64          # old-item tasks per meta step
  c.gme.support_rows = k          # padded width of batch a
  c.gme.query_rows = 2 * k        # padded width of batch b
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a seconds-long CPU run (tests, CI, first look)."""
  c.seeds = 1
  c.optim.epochs = 1
  c.meta.epochs = 1
  c.meta.inner_steps = 2
  c.warmup.steps = 2
  c.metaemb.epochs = 1
  c.mwuf.epochs = 1
  c.cvar.epochs = 1
  c.emerg.epochs = 1
  c.emerg.warm_steps = 2
  c.gme.epochs = 1
  return c
