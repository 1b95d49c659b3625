"""A PyTorch statement of the official VQ-Diffusion model tree, denoiser side.

Written from microsoft/VQ-Diffusion: ``image_synthesis/modeling/transformers/
{transformer_utils.py, diffusion_transformer.py}``, ``modeling/embeddings/
{dalle_mask_image_embedding.py, class_embedding.py}``, ``modeling/models/
{dalle.py, conditional_dalle.py, unconditional_dalle.py}`` and ``engine/
{ema.py, solver.py}``. Module and attribute names, registered buffers and the
forward math are the official ones, so ``state_dict()`` has the official keys
and ``DiffusionTransformer.predict_start`` gives the official
log p(x_0 | x_t). Models are built from the ``model`` section of an official
yaml (``build_model``); ``text_config``, ``class_config`` and
``unconditional_config`` write that section, at the official sizes by default.

Left out: the sampling loops, the loss and the CUDA moves. Two stand-ins keep
only the official key prefixes: ``CLIPTextEmbedding`` holds the CLIP text
tower's parameters under their official names without a forward (the tests
feed text features directly), and ``CodecStandIn`` a few convolutions under
``enc`` / ``dec`` sharing one quantizer, as the taming codecs wire theirs.

``EMA`` and ``save_checkpoint`` write a ``.pth`` as the official solver does:
``model`` is the whole model's state dict, ``ema`` the state dict of
``model.get_ema_model()``, the DiffusionTransformer, so its keys lack the
leading ``transformer.``.
"""

import collections
import copy
import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional

# DiffusionTransformer's learnable null text: the official fixes its shape.
EMPTY_TEXT_SHAPE = (77, 512)
# configs/coco.yaml's CLIPTextEmbedding is CLIP ViT-B/32's text tower.
CLIP_VIT_B32 = {"num_embed": 49408, "width": 512, "layers": 12, "heads": 8, "embed_dim": 512}


def _heads(x, n_head):
  batch, length, width = x.shape
  return x.view(batch, length, n_head, width // n_head).transpose(1, 2)


def _attend(module, x, context):
  """The official attention of FullAttention / CrossAttention (no mask is applied)."""
  batch, length, width = x.shape
  k = _heads(module.key(context), module.n_head)
  q = _heads(module.query(x), module.n_head)
  v = _heads(module.value(context), module.n_head)
  att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
  att = module.attn_drop(functional.softmax(att, dim=-1))
  y = (att @ v).transpose(1, 2).contiguous().view(batch, length, width)
  return module.resid_drop(module.proj(y)), att.mean(dim=1)


class FullAttention(nn.Module):
  """Self-attention; ``causal`` is stored but registers nothing."""

  def __init__(self, n_embd, n_head, seq_len=None, attn_pdrop=0.1, resid_pdrop=0.1,
               causal=True):
    super().__init__()
    assert n_embd % n_head == 0
    self.key = nn.Linear(n_embd, n_embd)
    self.query = nn.Linear(n_embd, n_embd)
    self.value = nn.Linear(n_embd, n_embd)
    self.attn_drop = nn.Dropout(attn_pdrop)
    self.resid_drop = nn.Dropout(resid_pdrop)
    self.proj = nn.Linear(n_embd, n_embd)
    self.n_head = n_head
    self.causal = causal

  def forward(self, x, encoder_output, mask=None):
    return _attend(self, x, x)


class CrossAttention(nn.Module):
  """Attention over the text features, with the persistent causal ``mask`` it never reads."""

  def __init__(self, condition_seq_len, n_embd, condition_embd, n_head, seq_len=None,
               attn_pdrop=0.1, resid_pdrop=0.1, causal=True):
    super().__init__()
    assert n_embd % n_head == 0
    self.key = nn.Linear(condition_embd, n_embd)
    self.query = nn.Linear(n_embd, n_embd)
    self.value = nn.Linear(condition_embd, n_embd)
    self.attn_drop = nn.Dropout(attn_pdrop)
    self.resid_drop = nn.Dropout(resid_pdrop)
    self.proj = nn.Linear(n_embd, n_embd)
    self.n_head = n_head
    self.causal = causal
    if self.causal:
      self.register_buffer(
          "mask", torch.tril(torch.ones(seq_len, seq_len)).view(1, 1, seq_len, seq_len))

  def forward(self, x, encoder_output, mask=None):
    return _attend(self, x, encoder_output)


class GELU2(nn.Module):
  def forward(self, x):
    return x * functional.sigmoid(1.702 * x)


class AdaLayerNorm(nn.Module):
  """LayerNorm modulated by a table row; an index past the table reads its mean row.

  As in the official, the first index of the batch decides that for the
  whole batch. Only the learned-table kind is stated: no official config
  uses the sinusoidal ("abs") one.
  """

  def __init__(self, n_embd, diffusion_step, emb_type="adalayernorm_abs"):
    super().__init__()
    if "abs" in emb_type:
      raise NotImplementedError(f"{emb_type}: no official config uses sinusoidal AdaLayerNorm")
    self.emb = nn.Embedding(diffusion_step, n_embd)
    self.silu = nn.SiLU()
    self.linear = nn.Linear(n_embd, n_embd * 2)
    self.layernorm = nn.LayerNorm(n_embd, elementwise_affine=False)
    self.diff_step = diffusion_step

  def forward(self, x, timestep):
    if timestep[0] >= self.diff_step:
      row = self.emb.weight.mean(dim=0, keepdim=True).repeat(len(timestep), 1)
    else:
      row = self.emb(timestep)
    emb = self.linear(self.silu(row)).unsqueeze(1)
    scale, shift = torch.chunk(emb, 2, dim=2)
    return self.layernorm(x) * (1 + scale) + shift


class ConvMLP(nn.Module):
  """The official ``Conv_MLP``: 3x3 convolutions over the square token grid."""

  def __init__(self, n_embd, mlp_hidden_times, act, resid_pdrop):
    super().__init__()
    hidden = int(mlp_hidden_times * n_embd)
    self.conv1 = nn.Conv2d(n_embd, hidden, kernel_size=3, stride=1, padding=1)
    self.act = act
    self.conv2 = nn.Conv2d(hidden, n_embd, kernel_size=3, stride=1, padding=1)
    self.dropout = nn.Dropout(resid_pdrop)

  def forward(self, x):
    batch, length, width = x.shape
    side = int(math.sqrt(length))
    grid = x.transpose(1, 2).reshape(batch, width, side, length // side)  # b (h w) c -> b c h w
    out = self.conv2(self.act(self.conv1(grid)))
    return self.dropout(out.flatten(2).transpose(1, 2))


class Block(nn.Module):
  """One block; ``attn_type`` "selfcross" (text), "selfcondition" (class) or "self"."""

  def __init__(self, class_type="adalayernorm", class_number=1000, condition_seq_len=77,
               n_embd=1024, n_head=16, seq_len=256, attn_pdrop=0.1, resid_pdrop=0.1,
               mlp_hidden_times=4, activate="GELU", attn_type="full", condition_dim=1024,
               diffusion_step=100, timestep_type="adalayernorm", mlp_type="fc"):
    super().__init__()
    if attn_type not in ("selfcross", "selfcondition", "self"):
      raise ValueError(f"attn_type {attn_type!r}")
    self.attn_type = attn_type
    self.ln1 = AdaLayerNorm(n_embd, diffusion_step, timestep_type)
    self.ln2 = nn.LayerNorm(n_embd)
    if attn_type in ("self", "selfcondition"):
      self.attn = FullAttention(n_embd, n_head, seq_len, attn_pdrop, resid_pdrop)
      if attn_type == "selfcondition":
        self.ln2 = AdaLayerNorm(n_embd, class_number, class_type)
    else:
      self.attn1 = FullAttention(n_embd, n_head, seq_len, attn_pdrop, resid_pdrop)
      self.attn2 = CrossAttention(condition_seq_len, n_embd=n_embd, condition_embd=condition_dim,
                                  n_head=n_head, seq_len=seq_len, attn_pdrop=attn_pdrop,
                                  resid_pdrop=resid_pdrop)
      self.ln1_1 = AdaLayerNorm(n_embd, diffusion_step, timestep_type)
    act = nn.GELU() if activate == "GELU" else GELU2()
    if mlp_type == "conv_mlp":
      self.mlp = ConvMLP(n_embd, mlp_hidden_times, act, resid_pdrop)
    else:
      self.mlp = nn.Sequential(nn.Linear(n_embd, mlp_hidden_times * n_embd), act,
                               nn.Linear(mlp_hidden_times * n_embd, n_embd),
                               nn.Dropout(resid_pdrop))

  def forward(self, x, encoder_output, timestep, mask=None):
    if self.attn_type == "selfcross":
      a, att = self.attn1(self.ln1(x, timestep), encoder_output, mask=mask)
      x = x + a
      a, att = self.attn2(self.ln1_1(x, timestep), encoder_output, mask=mask)
      x = x + a
    elif self.attn_type == "selfcondition":
      a, att = self.attn(self.ln1(x, timestep), encoder_output, mask=mask)
      x = x + a
      return x + self.mlp(self.ln2(x, encoder_output.long())), att
    else:
      a, att = self.attn(self.ln1(x, timestep), encoder_output, mask=mask)
      x = x + a
    return x + self.mlp(self.ln2(x)), att


def _init_weights(module):
  """The official ``_init_weights``: N(0, 0.02) Linear / Embedding weights, zero biases."""
  if isinstance(module, nn.Linear | nn.Embedding):
    module.weight.data.normal_(mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
      module.bias.data.zero_()
  elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
    module.bias.data.zero_()
    module.weight.data.fill_(1.0)


class _ImageTransformer(nn.Module):
  """What the three official transformers share: content_emb, blocks, to_logits, forward."""

  def _build(self, content_emb_config, blocks, n_embd):
    self.content_emb = instantiate_from_config(content_emb_config)
    self.blocks = nn.Sequential(*blocks)
    self.to_logits = nn.Sequential(nn.LayerNorm(n_embd),
                                   nn.Linear(n_embd, self.content_emb.num_embed - 1))
    self.apply(_init_weights)

  def forward(self, input, cond_emb, t):
    emb = self.content_emb(input)
    for block in self.blocks:
      emb, _ = block(emb, cond_emb, t)
    return self.to_logits(emb).permute(0, 2, 1)  # b l c -> b c l


class Text2ImageTransformer(_ImageTransformer):
  def __init__(self, condition_seq_len=77, n_layer=14, n_embd=1024, n_head=16,
               content_seq_len=1024, attn_pdrop=0, resid_pdrop=0, mlp_hidden_times=4,
               block_activate=None, attn_type="selfcross", content_spatial_size=(32, 32),
               condition_dim=512, diffusion_step=1000, timestep_type="adalayernorm",
               content_emb_config=None, mlp_type="fc", checkpoint=False):
    super().__init__()
    assert attn_type == "selfcross"
    self.use_checkpoint = checkpoint
    # The official passes condition_seq_len positionally, into Block's class_type
    # slot; a selfcross block never reads it.
    blocks = [Block(condition_seq_len, n_embd=n_embd, n_head=n_head, seq_len=content_seq_len,
                    attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop,
                    mlp_hidden_times=mlp_hidden_times, activate=block_activate,
                    attn_type=attn_type, condition_dim=condition_dim,
                    diffusion_step=diffusion_step, timestep_type=timestep_type,
                    mlp_type=mlp_type) for _ in range(n_layer)]
    self._build(content_emb_config, blocks, n_embd)
    self.condition_seq_len = condition_seq_len
    self.content_seq_len = content_seq_len


class Condition2ImageTransformer(_ImageTransformer):
  def __init__(self, class_type="adalayernorm", class_number=1000, n_layer=24, n_embd=1024,
               n_head=16, content_seq_len=1024, attn_pdrop=0, resid_pdrop=0,
               mlp_hidden_times=4, block_activate=None, attn_type="selfcondition",
               content_spatial_size=(32, 32), diffusion_step=100,
               timestep_type="adalayernorm", content_emb_config=None, mlp_type="conv_mlp"):
    super().__init__()
    assert attn_type == "selfcondition"
    blocks = [Block(class_type=class_type, class_number=class_number, n_embd=n_embd,
                    n_head=n_head, seq_len=content_seq_len, attn_pdrop=attn_pdrop,
                    resid_pdrop=resid_pdrop, mlp_hidden_times=mlp_hidden_times,
                    activate=block_activate, attn_type=attn_type,
                    diffusion_step=diffusion_step, timestep_type=timestep_type,
                    mlp_type=mlp_type) for _ in range(n_layer)]
    self._build(content_emb_config, blocks, n_embd)
    self.content_seq_len = content_seq_len


class UnCondition2ImageTransformer(_ImageTransformer):
  def __init__(self, class_type="adalayernorm", n_layer=24, n_embd=512, n_head=16,
               content_seq_len=256, attn_pdrop=0, resid_pdrop=0, mlp_hidden_times=4,
               block_activate=None, attn_type="self", content_spatial_size=(16, 16),
               diffusion_step=100, timestep_type="adalayernorm", content_emb_config=None,
               mlp_type="conv_mlp"):
    super().__init__()
    assert attn_type == "self"
    blocks = [Block(n_embd=n_embd, n_head=n_head, seq_len=content_seq_len,
                    attn_pdrop=attn_pdrop, resid_pdrop=resid_pdrop,
                    mlp_hidden_times=mlp_hidden_times, activate=block_activate,
                    attn_type=attn_type, diffusion_step=diffusion_step,
                    timestep_type=timestep_type, mlp_type=mlp_type) for _ in range(n_layer)]
    self._build(content_emb_config, blocks, n_embd)
    self.content_seq_len = content_seq_len


class DalleMaskImageEmbedding(nn.Module):
  """Token table of K + 1 rows ([MASK] last) plus row / column tables of ``spatial_size``."""

  def __init__(self, num_embed=8192, spatial_size=(32, 32), embed_dim=3968, trainable=True,
               pos_emb_type="embedding"):
    super().__init__()
    if pos_emb_type != "embedding":
      raise NotImplementedError(f"pos_emb_type {pos_emb_type!r}: no official config uses it")
    self.spatial_size = list(spatial_size)
    self.num_embed = num_embed + 1
    self.embed_dim = embed_dim
    self.trainable = trainable
    self.pos_emb_type = pos_emb_type
    self.emb = nn.Embedding(self.num_embed, embed_dim)
    self.height_emb = nn.Embedding(self.spatial_size[0], embed_dim)
    self.width_emb = nn.Embedding(self.spatial_size[1], embed_dim)

  def forward(self, index, **kwargs):
    assert index.dim() == 2
    emb = self.emb(index.clamp(min=0))  # the official sets negative indices to 0
    rows, cols = self.spatial_size
    height = self.height_emb(torch.arange(rows, device=index.device)).view(1, rows, 1, -1)
    width = self.width_emb(torch.arange(cols, device=index.device)).view(1, 1, cols, -1)
    pos_emb = (height + width).view(1, rows * cols, -1)
    return emb + pos_emb[:, :emb.shape[1], :]


class ClassEmbedding(nn.Module):
  """The class condition; ``identity`` (every official config) passes the labels through."""

  def __init__(self, num_embed=1000, embed_dim=512, identity=False, trainable=True):
    super().__init__()
    self.identity = identity
    self.trainable = trainable
    self.num_embed = num_embed
    self.embed_dim = embed_dim
    if not identity:
      self.emb = nn.Embedding(num_embed, embed_dim)

  def forward(self, index, **kwargs):
    return index if self.identity else self.emb(index).unsqueeze(1)


class _ResidualAttentionBlock(nn.Module):
  def __init__(self, width, heads):
    super().__init__()
    self.attn = nn.MultiheadAttention(width, heads)
    self.ln_1 = nn.LayerNorm(width)
    self.mlp = nn.Sequential(collections.OrderedDict([
        ("c_fc", nn.Linear(width, 4 * width)), ("gelu", GELU2()),
        ("c_proj", nn.Linear(4 * width, width))]))
    self.ln_2 = nn.LayerNorm(width)


class _ClipTransformer(nn.Module):
  def __init__(self, width, layers, heads):
    super().__init__()
    self.width = width
    self.layers = layers
    self.resblocks = nn.Sequential(*[_ResidualAttentionBlock(width, heads) for _ in range(layers)])


class CLIPTextEmbedding(nn.Module):
  """Stand-in: the CLIP text tower's parameters under the official names; no forward.

  ``width`` / ``layers`` / ``heads`` size it (ViT-B/32 by default); the
  official yaml's flags (normalize, pick_last_embedding, ...) are accepted
  and ignored.
  """

  def __init__(self, num_embed=49408, embed_dim=512, width=512, layers=12, heads=8,
               context_length=77, **flags):
    super().__init__()
    self.num_embed = num_embed
    self.token_embedding = nn.Embedding(num_embed, width)
    self.positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
    self.transformer = _ClipTransformer(width, layers, heads)
    self.ln_final = nn.LayerNorm(width)
    self.text_projection = nn.Parameter(0.01 * torch.randn(width, embed_dim))
    self.embed_dim = embed_dim
    for p in self.parameters():  # the official CLIP embedding is frozen
      p.requires_grad = False


class _Quantize(nn.Module):
  def __init__(self, codes, channels):
    super().__init__()
    self.embed = nn.Embedding(codes, channels)


class _Encoder(nn.Module):
  def __init__(self, encoder, quant_conv, quantize):
    super().__init__()
    self.encoder = encoder
    self.quant_conv = quant_conv
    self.quantize = quantize


class _Decoder(nn.Module):
  def __init__(self, decoder, post_quant_conv, quantize):
    super().__init__()
    self.decoder = decoder
    self.post_quant_conv = post_quant_conv
    self.quantize = quantize


class CodecStandIn(nn.Module):
  """Stand-in for the VQ codec: ``enc`` and ``dec`` sharing one quantizer, frozen."""

  def __init__(self, channels=4, codes=8, trainable=False, **options):
    super().__init__()
    quantize = _Quantize(codes, channels)
    self.enc = _Encoder(nn.Conv2d(3, channels, 3), nn.Conv2d(channels, channels, 1), quantize)
    self.dec = _Decoder(nn.Conv2d(channels, 3, 3), nn.Conv2d(channels, channels, 1), quantize)
    self.trainable = trainable
    for p in self.parameters():
      p.requires_grad = trainable


class Tokenize(nn.Module):
  """The text codec: a tokenizer only, nothing in the state dict."""

  def __init__(self, **options):
    super().__init__()


def alpha_schedule(time_step, n, att_1=0.99999, att_t=0.000009, ctt_1=0.000009, ctt_t=0.99999):
  """The official ``alpha_schedule``: per-step and cumulative (a, b, c) of the noise."""
  att = np.arange(0, time_step) / (time_step - 1) * (att_t - att_1) + att_1
  att = np.concatenate(([1], att))
  at = att[1:] / att[:-1]
  ctt = np.arange(0, time_step) / (time_step - 1) * (ctt_t - ctt_1) + ctt_1
  ctt = np.concatenate(([0], ctt))
  one_minus_ctt = 1 - ctt
  ct = 1 - one_minus_ctt[1:] / one_minus_ctt[:-1]
  bt = (1 - at - ct) / n
  att = np.concatenate((att[1:], [1]))
  ctt = np.concatenate((ctt[1:], [0]))
  btt = (1 - att - ctt) / n
  return at, bt, ct, att, btt, ctt


def log_1_min_a(a):
  return torch.log(1 - a.exp() + 1e-40)


def log_add_exp(a, b):
  maximum = torch.max(a, b)
  return maximum + torch.log(torch.exp(a - maximum) + torch.exp(b - maximum))


def index_to_log_onehot(x, num_classes):
  log_x = functional.one_hot(x, num_classes).permute(0, 2, 1)
  return torch.log(log_x.float().clamp(min=1e-30))


class DiffusionTransformer(nn.Module):
  """condition_emb + transformer + the schedule buffers (+ ``empty_text_embed``)."""

  def __init__(self, *, content_emb_config=None, condition_emb_config=None,
               transformer_config=None, diffusion_step=100, alpha_init_type="cos",
               auxiliary_loss_weight=0, adaptive_auxiliary_loss=False, mask_weight=(1, 1),
               learnable_cf=False):
    super().__init__()
    if condition_emb_config is None:
      self.condition_emb = None
    else:
      self.condition_emb = instantiate_from_config(condition_emb_config)
      self.condition_dim = self.condition_emb.embed_dim
    params = dict(transformer_config["params"], diffusion_step=diffusion_step,
                  content_emb_config=content_emb_config)
    self.transformer = instantiate_from_config({**transformer_config, "params": params})
    self.content_seq_len = params["content_seq_len"]
    self.num_classes = self.transformer.content_emb.num_embed
    self.num_timesteps = diffusion_step
    if alpha_init_type != "alpha1":
      raise ValueError(f"alpha_init_type {alpha_init_type!r}: the official has only alpha1")
    self._register_schedule()
    if learnable_cf:
      self.empty_text_embed = nn.Parameter(
          torch.randn(size=EMPTY_TEXT_SHAPE, requires_grad=True, dtype=torch.float64))
    self.learnable_cf = learnable_cf
    self.zero_vector = None

  def _register_schedule(self):
    # Computed on the CPU even under a meta device context: the official checks them.
    def tensor(x):
      return torch.tensor(x.astype("float64"), device="cpu")
    at, bt, ct, att, btt, ctt = (tensor(x) for x in alpha_schedule(
        self.num_timesteps, n=self.num_classes - 1))
    log_ct, log_cumprod_ct = torch.log(ct), torch.log(ctt)
    log_1_min_ct = log_1_min_a(log_ct)
    log_1_min_cumprod_ct = log_1_min_a(log_cumprod_ct)
    assert log_add_exp(log_ct, log_1_min_ct).abs().sum().item() < 1.e-5
    assert log_add_exp(log_cumprod_ct, log_1_min_cumprod_ct).abs().sum().item() < 1.e-5
    buffers = {"log_at": torch.log(at), "log_bt": torch.log(bt), "log_ct": log_ct,
               "log_cumprod_at": torch.log(att), "log_cumprod_bt": torch.log(btt),
               "log_cumprod_ct": log_cumprod_ct, "log_1_min_ct": log_1_min_ct,
               "log_1_min_cumprod_ct": log_1_min_cumprod_ct}
    for name, value in buffers.items():
      self.register_buffer(name, value.float())
    self.register_buffer("Lt_history", torch.zeros(self.num_timesteps))
    self.register_buffer("Lt_count", torch.zeros(self.num_timesteps))

  def predict_start(self, log_x_t, cond_emb, t):
    """log p(x_0 | x_t), (B, K + 1, N): the network's K classes, then -70 for [MASK]."""
    x_t = log_x_t.argmax(1)
    out = self.transformer(x_t, cond_emb, t)
    assert out.size(1) == self.num_classes - 1
    log_pred = functional.log_softmax(out.double(), dim=1).float()
    batch_size = log_x_t.size()[0]
    self.zero_vector = torch.zeros(batch_size, 1, self.content_seq_len).type_as(log_x_t) - 70
    return torch.clamp(torch.cat((log_pred, self.zero_vector), dim=1), -70, 0)


class DALLE(nn.Module):
  """models/dalle.py: the text-to-image model."""

  def __init__(self, *, content_info=None, condition_info=None, learnable_cf=False,
               content_codec_config, condition_codec_config, diffusion_config):
    super().__init__()
    self.learnable_cf = learnable_cf
    self.content_codec = instantiate_from_config(content_codec_config)
    self.condition_codec = instantiate_from_config(condition_codec_config)
    self.transformer = instantiate_from_config(diffusion_config)

  def get_ema_model(self):
    return self.transformer


class ConditionalDALLE(nn.Module):
  """models/conditional_dalle.py ``C_DALLE``: the class-conditional model."""

  def __init__(self, *, content_info=None, condition_info=None, guidance_scale=1.0,
               learnable_cf=False, content_codec_config, diffusion_config):
    super().__init__()
    self.guidance_scale = guidance_scale
    self.content_codec = instantiate_from_config(content_codec_config)
    self.transformer = instantiate_from_config(diffusion_config)

  def get_ema_model(self):
    return self.transformer


class UnconditionalDALLE(nn.Module):
  """models/unconditional_dalle.py ``UC_DALLE``: the unconditional model."""

  def __init__(self, *, content_info=None, content_codec_config, diffusion_config):
    super().__init__()
    self.content_codec = instantiate_from_config(content_codec_config)
    self.transformer = instantiate_from_config(diffusion_config)

  def get_ema_model(self):
    return self.transformer


# The official yaml targets, by their last dotted component.
TARGETS = {
    "DALLE": DALLE, "C_DALLE": ConditionalDALLE, "UC_DALLE": UnconditionalDALLE,
    "DiffusionTransformer": DiffusionTransformer,
    "Text2ImageTransformer": Text2ImageTransformer,
    "Condition2ImageTransformer": Condition2ImageTransformer,
    "UnCondition2ImageTransformer": UnCondition2ImageTransformer,
    "DalleMaskImageEmbedding": DalleMaskImageEmbedding, "ClassEmbedding": ClassEmbedding,
    "CLIPTextEmbedding": CLIPTextEmbedding, "Tokenize": Tokenize,
    "TamingGumbelVQVAE": CodecStandIn, "TamingVQVAE": CodecStandIn,
    "TamingFFHQVQVAE": CodecStandIn, "PatchVQVAE": CodecStandIn,
}


def instantiate_from_config(config):
  if config is None:
    return None
  return TARGETS[config["target"].rsplit(".", 1)[-1]](**config.get("params", {}))


def build_model(config):
  """The model of an official yaml's ``model`` section, in eval mode (dropout off)."""
  return instantiate_from_config(config).eval()


def _content_emb(num_embed, spatial_size, n_embd):
  return {"target": "image_synthesis.modeling.embeddings.dalle_mask_image_embedding."
                    "DalleMaskImageEmbedding",
          "params": {"num_embed": num_embed, "spatial_size": tuple(spatial_size),
                     "embed_dim": n_embd, "trainable": True, "pos_emb_type": "embedding"}}


def _codec(target, codec):
  return {"target": f"image_synthesis.modeling.codecs.image_codec.{target}",
          "params": {"trainable": False, **(codec or {})}}


def _diffusion(transformer_target, transformer_params, content_emb, diffusion_step,
               learnable_cf, condition_emb=None):
  params = {"diffusion_step": diffusion_step, "alpha_init_type": "alpha1",
            "content_emb_config": content_emb, "condition_emb_config": condition_emb,
            "transformer_config": {
                "target": f"image_synthesis.modeling.transformers.transformer_utils."
                          f"{transformer_target}",
                "params": {"attn_pdrop": 0.0, "resid_pdrop": 0.0, "block_activate": "GELU2",
                           "timestep_type": "adalayernorm", "mlp_hidden_times": 4,
                           **transformer_params}},
            "learnable_cf": learnable_cf}
  return {"target": "image_synthesis.modeling.transformers.diffusion_transformer."
                    "DiffusionTransformer", "params": params}


def text_config(*, n_layer=19, n_embd=1024, n_head=16, num_embed=2887, spatial_size=(32, 32),
                condition_dim=512, diffusion_step=100, learnable_cf=False, clip=None,
                codec=None):
  """A DALLE yaml ``model`` section; the defaults are config_text.yaml's (COCO / CUB / CC).

  ``clip``: the CLIP stand-in's sizes (default ViT-B/32); ``codec``: the
  codec stand-in's.
  """
  transformer = {"attn_type": "selfcross", "n_layer": n_layer, "condition_seq_len": 77,
                 "content_seq_len": spatial_size[0] * spatial_size[1],
                 "content_spatial_size": list(spatial_size), "n_embd": n_embd,
                 "condition_dim": condition_dim, "n_head": n_head}
  clip_config = {"target": "image_synthesis.modeling.embeddings.clip_text_embedding."
                           "CLIPTextEmbedding",
                 "params": {**CLIP_VIT_B32, **(clip or {}), "normalize": True,
                            "pick_last_embedding": False, "keep_seq_len_dim": False,
                            "additional_last_embedding": False}}
  diffusion = _diffusion("Text2ImageTransformer", transformer,
                         _content_emb(num_embed, spatial_size, n_embd), diffusion_step,
                         learnable_cf, clip_config)
  return {"target": "image_synthesis.modeling.models.dalle.DALLE",
          "params": {"learnable_cf": learnable_cf,
                     "content_codec_config": _codec("taming_gumbel_vqvae.TamingGumbelVQVAE",
                                                    codec),
                     "condition_codec_config": {
                         "target": "image_synthesis.modeling.codecs.text_codec.tokenize."
                                   "Tokenize",
                         "params": {"context_length": 77, "with_mask": True}},
                     "diffusion_config": diffusion}}


def class_config(*, n_layer=24, n_embd=512, n_head=16, num_embed=974, spatial_size=(16, 16),
                 emb_spatial_size=(32, 32), class_number=1000, diffusion_step=100,
                 learnable_cf=False, codec=None):
  """A C_DALLE yaml ``model`` section; the defaults are config_imagenet.yaml's.

  imagenet_learnable.pth is this with ``class_number=1001`` (the official
  inference sets it for ``imagenet_cf``) and, from its training,
  ``learnable_cf=True``.
  """
  transformer = {"attn_type": "selfcondition", "n_layer": n_layer, "class_type": "adalayernorm",
                 "class_number": class_number,
                 "content_seq_len": spatial_size[0] * spatial_size[1],
                 "content_spatial_size": list(spatial_size), "n_embd": n_embd,
                 "n_head": n_head, "mlp_type": "conv_mlp"}
  classes = {"target": "image_synthesis.modeling.embeddings.class_embedding.ClassEmbedding",
             "params": {"num_embed": 1000, "embed_dim": n_embd, "identity": True}}
  diffusion = _diffusion("Condition2ImageTransformer", transformer,
                         _content_emb(num_embed, emb_spatial_size, n_embd), diffusion_step,
                         learnable_cf, classes)
  return {"target": "image_synthesis.modeling.models.conditional_dalle.C_DALLE",
          "params": {"content_codec_config": _codec("taming_gumbel_vqvae.TamingVQVAE", codec),
                     "diffusion_config": diffusion}}


def unconditional_config(*, n_layer=20, n_embd=512, n_head=16, num_embed=1024,
                         spatial_size=(16, 16), emb_spatial_size=(32, 32), diffusion_step=100,
                         codec=None):
  """A UC_DALLE yaml ``model`` section; the defaults are configs/ffhq.yaml's."""
  transformer = {"attn_type": "self", "n_layer": n_layer,
                 "content_seq_len": spatial_size[0] * spatial_size[1],
                 "content_spatial_size": list(spatial_size), "n_embd": n_embd,
                 "n_head": n_head, "mlp_type": "conv_mlp"}
  diffusion = _diffusion("UnCondition2ImageTransformer", transformer,
                         _content_emb(num_embed, emb_spatial_size, n_embd), diffusion_step,
                         False)
  return {"target": "image_synthesis.modeling.models.unconditional_dalle.UC_DALLE",
          "params": {"content_codec_config": _codec("taming_gumbel_vqvae.TamingFFHQVQVAE",
                                                    codec),
                     "diffusion_config": diffusion}}


# The model section of each released checkpoint's yaml, at the official sizes.
RELEASED = {
    "coco": lambda: text_config(),
    "cub200": lambda: text_config(),
    "cc": lambda: text_config(),
    "coco_learnable": lambda: text_config(learnable_cf=True),
    "cc_learnable": lambda: text_config(learnable_cf=True),
    "ithq": lambda: text_config(n_layer=36, n_embd=1408, num_embed=4096, learnable_cf=True),
    "imagenet": lambda: class_config(),
    "imagenet_learnable": lambda: class_config(class_number=1001, learnable_cf=True),
    "ffhq": lambda: unconditional_config(),
}


class EMA:
  """engine/ema.py: a copy of ``model.get_ema_model()``, every state entry averaged."""

  def __init__(self, model, decay=0.99, update_interval=1):
    self.decay = decay
    self.update_interval = update_interval
    self.model = model
    with torch.no_grad():
      self.ema_model = copy.deepcopy(model.get_ema_model())

  def update(self, iteration):
    if (iteration + 1) % self.update_interval:
      return
    current = self.model.get_ema_model().state_dict()
    state = self.ema_model.state_dict()
    for key in state:
      state[key] = state[key] * self.decay + current[key].clone() * (1 - self.decay)
    self.ema_model.load_state_dict(state)

  def state_dict(self):
    return self.ema_model.state_dict()


def _scheduler_state(last_epoch):
  """ReduceLROnPlateauWithWarmup.state_dict() under configs/coco.yaml's solver."""
  return {"factor": 0.5, "min_lrs": [1.0e-6], "patience": 60000, "verbose": False,
          "cooldown": 0, "cooldown_counter": 0, "mode": "min", "threshold": 0.1,
          "threshold_mode": "rel", "warmup_lr": 2.0e-4, "warmup": 1000, "best": math.inf,
          "num_bad_epochs": 0, "mode_worse": math.inf, "eps": 1e-8, "last_epoch": last_epoch,
          "warmup_lrs": [2.0e-4], "warmup_lr_steps": [2.0e-7]}


def save_checkpoint(path, model, ema, optimizer, *, last_epoch=0, last_iter=0, **extra):
  """``torch.save`` of the dict the official ``Solver.save`` writes.

  Args:
    path: the ``.pth`` to write.
    model: the DALLE-level model (its ``state_dict()`` is ``model``).
    ema: an ``EMA`` (its ``state_dict()``, the DiffusionTransformer's, is ``ema``) or None.
    optimizer: the torch optimizer, saved under ``optimizer_and_scheduler``.
    last_epoch, last_iter: the solver's counters.
    **extra: more top-level entries.
  """
  state = {"last_epoch": last_epoch, "last_iter": last_iter, "model": model.state_dict()}
  if ema is not None:
    state["ema"] = ema.state_dict()
  state["clip_grad_norm"] = {"start_iteration": 0, "end_iteration": 5000, "max_norm": 0.5,
                             "last_epoch": last_iter}
  state["optimizer_and_scheduler"] = {"none": {
      "name": "none", "start_epoch": 0, "end_epoch": -1, "start_iteration": 0,
      "end_iteration": -1,
      "optimizer": {"step_iteration": 1, "module": optimizer.state_dict()},
      "scheduler": {"step_iteration": 1, "module": _scheduler_state(last_iter)}}}
  torch.save(state | extra, path)
