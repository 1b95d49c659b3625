"""A PyTorch statement of the ITHQ image codec microsoft/VQ-Diffusion ships.

Written from the official sources ``image_synthesis/modeling/codecs/image_codec/
patch_vqgan.py`` (``EMAVectorQuantizer``, ``Encoder``, ``Decoder`` and their blocks,
``PatchVQGAN``) and ``.../ema_vqvae.py`` (``PatchVQVAE`` and its ``Encoder`` / ``Decoder``
wrappers) with the same module, attribute and buffer names, so ``state_dict()`` yields the
official key names. ``PatchVQGAN`` takes its encoder / decoder configs as the official YAML
writes them (``{"target": ..., "params": ...}``); ``PatchVQVAE`` takes the built model instead
of reading ``OUTPUT/pretrained_model/taming_dvae``. Left out: the loss, training hooks,
the masked-token path of the quantizer and the ``requires_image`` decoders. The blocks
patch_vqgan.py repeats unchanged from taming (``ResnetBlock``, ``AttnBlock``,
``Downsample``, ``Normalize``) come from ``official_taming``.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the official spelling)
from torch import nn

from tests.official_taming import AttnBlock, Downsample, Normalize, ResnetBlock, nonlinearity


class EMAVectorQuantizer(nn.Module):

  def __init__(self, n_e, e_dim, beta, masked_n_e_ratio=0, embed_init_scale=1.0, decay=0.99,
               embed_ema=True, get_embed_type="retrive", distance_type="euclidean"):
    super().__init__()
    self.n_e, self.e_dim, self.beta, self.decay = n_e, e_dim, beta, decay
    self.masked_n_e_ratio = masked_n_e_ratio
    self.embed_ema = embed_ema
    self.get_embed_type = get_embed_type
    self.distance_type = distance_type
    if embed_ema:
      self.eps = 1.0e-5
      embed = torch.randn(n_e, e_dim)
      self.register_buffer("embedding", embed)
      self.register_buffer("cluster_size", torch.zeros(n_e))
      self.register_buffer("embedding_avg", embed.clone())
    else:
      self.embedding = nn.Embedding(n_e, e_dim)
      self.embedding.weight.data.uniform_(-embed_init_scale / n_e, embed_init_scale / n_e)
    self.masked_embed_start = n_e - int(masked_n_e_ratio * n_e)
    if distance_type == "learned":
      self.distance_fc = nn.Linear(e_dim, n_e)

  @property
  def embed_weight(self):
    return self.embedding.weight if isinstance(self.embedding, nn.Embedding) else self.embedding

  def norm_embedding(self):
    if self.training:
      with torch.no_grad():
        w = F.normalize(self.embed_weight.data.clone(), dim=1, p=2)
        if isinstance(self.embedding, nn.Embedding):
          self.embedding.weight.copy_(w)
        else:
          self.embedding.copy_(w)

  def _quantize(self, z):
    if self.distance_type == "euclidean":
      d = (torch.sum(z ** 2, dim=1, keepdim=True) + torch.sum(self.embed_weight ** 2, dim=1)
           - 2 * torch.matmul(z, self.embed_weight.t()))
    elif self.distance_type == "cosine":
      d = 0 - torch.einsum("ld,nd->ln", z, self.embed_weight)
    else:
      raise NotImplementedError(f"distance not implemented for {self.distance_type}")
    min_encoding_indices = torch.argmin(d, dim=1)
    if self.get_embed_type == "matmul":
      min_encodings = torch.zeros(min_encoding_indices.shape[0], self.n_e).to(z)
      min_encodings.scatter_(1, min_encoding_indices.unsqueeze(1), 1)
      z_q = torch.matmul(min_encodings, self.embed_weight)
    elif self.get_embed_type == "retrive":
      z_q = F.embedding(min_encoding_indices, self.embed_weight)
    else:
      raise NotImplementedError
    return z_q, min_encoding_indices

  def forward(self, z):
    if self.distance_type in ["sinkhorn", "cosine"]:
      self.norm_embedding()
      z = F.normalize(z, dim=1, p=2)
    batch_size, _, height, width = z.shape
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flattened = z.view(-1, self.e_dim)
    z_q, min_encoding_indices = self._quantize(z_flattened)
    z_q = z_q.view(batch_size, height, width, -1)
    if self.training and self.embed_ema:
      indices_onehot = F.one_hot(min_encoding_indices, self.n_e).to(z_flattened.dtype)
      indices_onehot_sum = indices_onehot.sum(0)
      z_sum = (z_flattened.transpose(0, 1) @ indices_onehot).transpose(0, 1)
      self.cluster_size.data.mul_(self.decay).add_(indices_onehot_sum, alpha=1 - self.decay)
      self.embedding_avg.data.mul_(self.decay).add_(z_sum, alpha=1 - self.decay)
      n = self.cluster_size.sum()
      cluster_size = (self.cluster_size + self.eps) / (n + self.n_e * self.eps) * n
      self.embedding.data.copy_(self.embedding_avg / cluster_size.unsqueeze(1))
    if self.embed_ema:
      loss = (z_q.detach() - z).pow(2).mean()
    else:
      loss = (torch.mean((z_q.detach() - z).pow(2))
              + self.beta * torch.mean((z_q - z.detach()).pow(2)))
    z_q = z + (z_q - z).detach()
    z_q = z_q.permute(0, 3, 1, 2).contiguous()
    return {"quantize": z_q, "quantize_loss": loss,
            "used_quantize_embed": torch.zeros_like(loss)
            + min_encoding_indices.unique().shape[0],
            "index": min_encoding_indices.view(batch_size, height, width)}

  def only_get_indices(self, z):
    if self.distance_type in ["sinkhorn", "cosine"]:
      self.norm_embedding()
      z = F.normalize(z, dim=1, p=2)
    batch_size, _, height, width = z.shape
    z_flattened = z.permute(0, 2, 3, 1).contiguous().view(-1, self.e_dim)
    _, min_encoding_indices = self._quantize(z_flattened)
    return min_encoding_indices.view(batch_size, height, width)

  def get_codebook_entry(self, indices, shape):
    if self.get_embed_type == "matmul":
      min_encodings = torch.zeros(indices.shape[0], self.n_e).to(indices)
      min_encodings.scatter_(1, indices[:, None], 1)
      z_q = torch.matmul(min_encodings.float(), self.embed_weight)
    elif self.get_embed_type == "retrive":
      z_q = F.embedding(indices, self.embed_weight)
    else:
      raise NotImplementedError
    if shape is not None:
      z_q = z_q.view(*shape, -1)
      if len(z_q.shape) == 4:
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
    return z_q


class Upsample(nn.Module):

  def __init__(self, in_channels, with_conv, upsample_type="interpolate"):
    super().__init__()
    self.upsample_type = upsample_type
    self.with_conv = with_conv
    if upsample_type == "conv":
      # The official line ends in a comma, so this is a tuple and registers nothing.
      self.sample = nn.ConvTranspose2d(in_channels, in_channels, kernel_size=4, stride=2,
                                       padding=1),
    if with_conv:
      self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    if self.upsample_type == "conv":
      x = self.sample(x)
    else:
      x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return self.conv(x) if self.with_conv else x


def _pair(resolution):
  if isinstance(resolution, int):
    return [resolution, resolution]
  if isinstance(resolution, (tuple, list)):
    return list(resolution)
  raise ValueError("Unknown type of resolution:", resolution)


def _pairs(attn_resolutions):
  return [list(ar) if isinstance(ar, (list, tuple)) else [ar, ar] for ar in attn_resolutions]


class Encoder(nn.Module):

  def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), scale_by_2=None, num_res_blocks,
               attn_resolutions, dropout=0.0, resamp_with_conv=True, in_channels, resolution,
               z_channels, double_z=False, **ignore_kwargs):
    super().__init__()
    resolution = _pair(resolution)
    attn_resolutions = _pairs(attn_resolutions)
    self.ch = ch
    self.temb_ch = 0
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.resolution = resolution
    self.in_channels = in_channels
    self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
    curr_res = resolution
    in_ch_mult = (1,) + tuple(ch_mult)
    self.down = nn.ModuleList()
    for i_level in range(self.num_resolutions):
      block, attn = nn.ModuleList(), nn.ModuleList()
      block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
      for _ in range(num_res_blocks):
        block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                 temb_channels=self.temb_ch, dropout=dropout))
        block_in = block_out
        if curr_res in attn_resolutions:
          attn.append(AttnBlock(block_in))
      down = nn.Module()
      down.block, down.attn = block, attn
      if (i_level != self.num_resolutions - 1 if scale_by_2 is None else scale_by_2[i_level]):
        down.downsample = Downsample(block_in, resamp_with_conv)
        curr_res = [r // 2 for r in curr_res]
      self.down.append(down)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                   temb_channels=self.temb_ch, dropout=dropout)
    self.mid.attn_1 = AttnBlock(block_in)
    self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                   temb_channels=self.temb_ch, dropout=dropout)
    self.norm_out = Normalize(block_in)
    self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                              kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    temb = None
    hs = [self.conv_in(x)]
    for i_level in range(self.num_resolutions):
      for i_block in range(self.num_res_blocks):
        h = self.down[i_level].block[i_block](hs[-1], temb)
        if len(self.down[i_level].attn) > 0:
          h = self.down[i_level].attn[i_block](h)
        hs.append(h)
      if getattr(self.down[i_level], "downsample", None) is not None:
        h = self.down[i_level].downsample(hs[-1])
      if i_level != self.num_resolutions - 1:
        hs.append(h)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(hs[-1], temb)), temb)
    return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), scale_by_2=None, num_res_blocks,
               attn_resolutions, dropout=0.0, resamp_with_conv=True, resolution, z_channels,
               **ignorekwargs):
    super().__init__()
    resolution = _pair(resolution)
    attn_resolutions = _pairs(attn_resolutions)
    self.ch = ch
    self.temb_ch = 0
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.resolution = resolution
    self.requires_image = False
    block_in = ch * ch_mult[self.num_resolutions - 1]
    if scale_by_2 is None:
      curr_res = [r // 2 ** (self.num_resolutions - 1) for r in resolution]
    else:
      curr_res = [r // 2 ** sum(int(s) for s in scale_by_2) for r in resolution]
    self.z_shape = (1, z_channels, curr_res[0], curr_res[1])
    self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
    self.mid = nn.Module()
    self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                   temb_channels=self.temb_ch, dropout=dropout)
    self.mid.attn_1 = AttnBlock(block_in)
    self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in,
                                   temb_channels=self.temb_ch, dropout=dropout)
    self.up = nn.ModuleList()
    for i_level in reversed(range(self.num_resolutions)):
      block, attn = nn.ModuleList(), nn.ModuleList()
      block_out = ch * ch_mult[i_level]
      for _ in range(num_res_blocks + 1):
        block.append(ResnetBlock(in_channels=block_in, out_channels=block_out,
                                 temb_channels=self.temb_ch, dropout=dropout))
        block_in = block_out
        if curr_res in attn_resolutions:
          attn.append(AttnBlock(block_in))
      up = nn.Module()
      up.block, up.attn = block, attn
      if (i_level != 0 if scale_by_2 is None else scale_by_2[i_level]):
        up.upsample = Upsample(block_in, resamp_with_conv)
        curr_res = [r * 2 for r in curr_res]
      self.up.insert(0, up)
    self.norm_out = Normalize(block_in)
    self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

  def forward(self, z, **kwargs):
    temb = None
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
    for i_level in reversed(range(self.num_resolutions)):
      for i_block in range(self.num_res_blocks + 1):
        h = self.up[i_level].block[i_block](h, temb)
        if len(self.up[i_level].attn) > 0:
          h = self.up[i_level].attn[i_block](h)
      if getattr(self.up[i_level], "upsample", None) is not None:
        h = self.up[i_level].upsample(h)
    return self.conv_out(nonlinearity(self.norm_out(h)))


_CLASSES = {"image_synthesis.modeling.codecs.image_codec.patch_vqgan.Encoder": Encoder,
            "image_synthesis.modeling.codecs.image_codec.patch_vqgan.Decoder": Decoder}


def instantiate_from_config(config):
  return _CLASSES[config["target"]](**config.get("params", {}))


class PatchVQGAN(nn.Module):
  """The codec model; ``quantizer_type`` 'EMAVQ' is the one the official file can build."""

  def __init__(self, *, encoder_config, decoder_config, lossconfig=None, n_embed, embed_dim,
               ignore_keys=(), data_info=None, quantizer_type="VQ",
               quantizer_dis_type="euclidean", decay=0.99, trainable=False, ckpt_path=None,
               token_shape=None):
    super().__init__()
    self.encoder = instantiate_from_config(encoder_config)
    self.decoder = instantiate_from_config(decoder_config)
    if quantizer_type != "EMAVQ":
      raise NotImplementedError(quantizer_type)
    self.quantize = EMAVectorQuantizer(n_embed, embed_dim, beta=0.25, decay=decay,
                                       distance_type=quantizer_dis_type)
    self.quant_conv = nn.Conv2d(encoder_config["params"]["z_channels"], embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, decoder_config["params"]["z_channels"], 1)
    self.data_info = data_info or {"key": "image"}
    self.loss = None
    self.trainable = trainable
    self.token_shape = token_shape

  def pre_process(self, data):
    return data / 127.5 - 1.0

  def post_process(self, data):
    return torch.clamp((data + 1.0) * 127.5, min=0.0, max=255.0)


class PatchEncoder(nn.Module):
  """``ema_vqvae.Encoder``: [0, 1] images -> flat code indices."""

  def __init__(self, encoder, quant_conv, quantize):
    super().__init__()
    self.encoder, self.quant_conv, self.quantize = encoder, quant_conv, quantize

  @torch.no_grad()
  def forward(self, x):
    x = 2 * x - 1
    h = self.quant_conv(self.encoder(x))
    indices = self.quantize.only_get_indices(h)
    return indices.view(x.shape[0], -1)


class PatchDecoder(nn.Module):
  """``ema_vqvae.Decoder``: a (B, h, w) index grid -> [0, 1] images."""

  def __init__(self, decoder, post_quant_conv, quantize, w=16, h=16):
    super().__init__()
    self.decoder, self.post_quant_conv, self.quantize = decoder, post_quant_conv, quantize
    self.w, self.h = w, h

  @torch.no_grad()
  def forward(self, indices):
    z = self.quantize.get_codebook_entry(indices.view(-1),
                                         shape=(indices.shape[0], self.h, self.w))
    x = torch.clamp(self.decoder(self.post_quant_conv(z)), -1., 1.)
    return (x + 1.) / 2.


class PatchVQVAE(nn.Module):
  """``ema_vqvae.PatchVQVAE`` around a built ``PatchVQGAN``: [0, 255] images <-> tokens."""

  def __init__(self, model, token_shape=(16, 16), trainable=False):
    super().__init__()
    self.enc = PatchEncoder(model.encoder, model.quant_conv, model.quantize)
    self.dec = PatchDecoder(model.decoder, model.post_quant_conv, model.quantize,
                            token_shape[0], token_shape[1])
    self.num_tokens = 4096
    self.trainable = trainable
    self.token_shape = list(token_shape)
    self.eval()

  def preprocess(self, imgs):
    return imgs.div(255)

  def postprocess(self, imgs):
    return imgs * 255

  def get_tokens(self, imgs, **kwargs):
    return {"token": self.enc(self.preprocess(imgs))}

  def decode(self, img_seq):
    b, n = img_seq.shape
    img_seq = img_seq.reshape(b, int(math.sqrt(n)), -1)
    return self.postprocess(self.dec(img_seq))
