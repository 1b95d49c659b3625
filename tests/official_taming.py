"""A PyTorch statement of the taming VQGANs and codec wrappers microsoft/VQ-Diffusion ships.

Written from the official sources (``image_synthesis/taming/modules/diffusionmodules/
model.py``, ``.../vqvae/quantize.py``, ``image_synthesis/taming/models/vqgan.py`` and
``image_synthesis/modeling/codecs/image_codec/taming_gumbel_vqvae.py``) with the same module
and attribute names, so ``state_dict()`` yields the official key names. Left out: the
timestep-embedding ``Model``, Lightning training hooks, taming's own ``remap`` option of the
quantizers (VQ-Diffusion's configs never set it) and ``VectorQuantizer2(legacy=False)``.
The codec wrappers take the model and the remap tensor instead of file paths; the loss
modules are stand-ins with parameters, so checkpoints carry ``loss.*`` keys as real ones do.
"""

import math

import torch
import torch.nn.functional as F  # noqa: N812 (the official spelling)
from torch import nn


def nonlinearity(x):
  return x * torch.sigmoid(x)


def Normalize(in_channels):  # noqa: N802 (the official name)
  return nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):

  def __init__(self, in_channels, with_conv):
    super().__init__()
    self.with_conv = with_conv
    if with_conv:
      self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

  def forward(self, x):
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):

  def __init__(self, in_channels, with_conv):
    super().__init__()
    self.with_conv = with_conv
    if with_conv:
      self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

  def forward(self, x):
    if self.with_conv:
      return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))
    return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):

  def __init__(self, *, in_channels, out_channels=None, conv_shortcut=False, dropout,
               temb_channels=512):
    super().__init__()
    self.in_channels = in_channels
    out_channels = in_channels if out_channels is None else out_channels
    self.out_channels = out_channels
    self.use_conv_shortcut = conv_shortcut
    self.norm1 = Normalize(in_channels)
    self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
    if temb_channels > 0:
      self.temb_proj = nn.Linear(temb_channels, out_channels)
    self.norm2 = Normalize(out_channels)
    self.dropout = nn.Dropout(dropout)
    self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
    if in_channels != out_channels:
      if conv_shortcut:
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1,
                                       padding=1)
      else:
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1,
                                      padding=0)

  def forward(self, x, temb):
    h = self.conv1(nonlinearity(self.norm1(x)))
    if temb is not None:
      h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
    h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))
    if self.in_channels != self.out_channels:
      x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
    return x + h


class AttnBlock(nn.Module):

  def __init__(self, in_channels):
    super().__init__()
    self.in_channels = in_channels
    self.norm = Normalize(in_channels)
    self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
    self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
    self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
    self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

  def forward(self, x):
    h_ = self.norm(x)
    q, k, v = self.q(h_), self.k(h_), self.v(h_)
    b, c, h, w = q.shape
    q = q.reshape(b, c, h * w).permute(0, 2, 1)
    k = k.reshape(b, c, h * w)
    w_ = torch.bmm(q, k) * (int(c) ** (-0.5))
    w_ = F.softmax(w_, dim=2)
    v = v.reshape(b, c, h * w)
    h_ = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + self.proj_out(h_)


class Encoder(nn.Module):

  def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
               dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
               double_z=True, **ignore_kwargs):
    super().__init__()
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
      down.block = block
      down.attn = attn
      if i_level != self.num_resolutions - 1:
        down.downsample = Downsample(block_in, resamp_with_conv)
        curr_res = curr_res // 2
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
      if i_level != self.num_resolutions - 1:
        hs.append(self.down[i_level].downsample(hs[-1]))
    h = hs[-1]
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
    return self.conv_out(nonlinearity(self.norm_out(h)))


class Decoder(nn.Module):

  def __init__(self, *, ch, out_ch, ch_mult=(1, 2, 4, 8), num_res_blocks, attn_resolutions,
               dropout=0.0, resamp_with_conv=True, in_channels, resolution, z_channels,
               give_pre_end=False, **ignorekwargs):
    super().__init__()
    self.ch = ch
    self.temb_ch = 0
    self.num_resolutions = len(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.resolution = resolution
    self.in_channels = in_channels
    self.give_pre_end = give_pre_end
    block_in = ch * ch_mult[self.num_resolutions - 1]
    curr_res = resolution // 2 ** (self.num_resolutions - 1)
    self.z_shape = (1, z_channels, curr_res, curr_res)
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
      up.block = block
      up.attn = attn
      if i_level != 0:
        up.upsample = Upsample(block_in, resamp_with_conv)
        curr_res = curr_res * 2
      self.up.insert(0, up)
    self.norm_out = Normalize(block_in)
    self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

  def forward(self, z):
    temb = None
    h = self.conv_in(z)
    h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, temb)), temb)
    for i_level in reversed(range(self.num_resolutions)):
      for i_block in range(self.num_res_blocks + 1):
        h = self.up[i_level].block[i_block](h, temb)
        if len(self.up[i_level].attn) > 0:
          h = self.up[i_level].attn[i_block](h)
      if i_level != 0:
        h = self.up[i_level].upsample(h)
    if self.give_pre_end:
      return h
    return self.conv_out(nonlinearity(self.norm_out(h)))


class VectorQuantizer(nn.Module):
  """taming's ``VectorQuantizer2`` (imported as ``VectorQuantizer`` by ``vqgan.py``)."""

  def __init__(self, n_e, e_dim, beta, remap=None, sane_index_shape=False, legacy=True):
    super().__init__()
    assert remap is None and legacy
    self.n_e, self.e_dim, self.beta = n_e, e_dim, beta
    self.embedding = nn.Embedding(n_e, e_dim)
    self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
    self.sane_index_shape = sane_index_shape

  def forward(self, z):
    z = z.permute(0, 2, 3, 1).contiguous()
    z_flattened = z.view(-1, self.e_dim)
    d = (torch.sum(z_flattened ** 2, dim=1, keepdim=True)
         + torch.sum(self.embedding.weight ** 2, dim=1)
         - 2 * torch.einsum("bd,dn->bn", z_flattened, self.embedding.weight.t()))
    min_encoding_indices = torch.argmin(d, dim=1)
    z_q = self.embedding(min_encoding_indices).view(z.shape)
    loss = (torch.mean((z_q.detach() - z) ** 2)
            + self.beta * torch.mean((z_q - z.detach()) ** 2))
    z_q = (z + (z_q - z).detach()).permute(0, 3, 1, 2).contiguous()
    if self.sane_index_shape:
      min_encoding_indices = min_encoding_indices.reshape(z_q.shape[0], z_q.shape[2],
                                                          z_q.shape[3])
    return z_q, loss, (None, None, min_encoding_indices)

  def get_codebook_entry(self, indices, shape):
    z_q = self.embedding(indices)
    if shape is not None:
      z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
    return z_q


class GumbelQuantize(nn.Module):

  def __init__(self, num_hiddens, embedding_dim, n_embed, straight_through=True,
               kl_weight=5e-4, temp_init=1.0, use_vqinterface=True, remap=None):
    super().__init__()
    assert remap is None
    self.embedding_dim, self.n_embed = embedding_dim, n_embed
    self.straight_through = straight_through
    self.temperature = temp_init
    self.kl_weight = kl_weight
    self.proj = nn.Conv2d(num_hiddens, n_embed, 1)
    self.embed = nn.Embedding(n_embed, embedding_dim)
    self.use_vqinterface = use_vqinterface
    self.remap = remap

  def forward(self, z, temp=None):
    hard = self.straight_through if self.training else True
    temp = self.temperature if temp is None else temp
    logits = self.proj(z)
    soft_one_hot = F.gumbel_softmax(logits, tau=temp, dim=1, hard=hard)
    z_q = torch.einsum("b n h w, n d -> b d h w", soft_one_hot, self.embed.weight)
    qy = F.softmax(logits, dim=1)
    diff = self.kl_weight * torch.sum(qy * torch.log(qy * self.n_embed + 1e-10), dim=1).mean()
    ind = soft_one_hot.argmax(dim=1)
    return z_q, diff, (None, None, ind)

  def get_codebook_entry(self, indices, shape):
    b, h, w, _ = shape
    assert b * h * w == indices.shape[0]
    indices = indices.reshape(b, h, w)
    one_hot = F.one_hot(indices, num_classes=self.n_embed).permute(0, 3, 1, 2).float()
    return torch.einsum("b n h w, n d -> b d h w", one_hot, self.embed.weight)


class LossStandIn(nn.Module):
  """Holds parameters under ``loss.*`` as ``VQLPIPSWithDiscriminator`` does."""

  def __init__(self):
    super().__init__()
    self.discriminator = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1))
    self.register_buffer("logvar", torch.zeros(()))


class VQModel(nn.Module):

  def __init__(self, ddconfig, n_embed, embed_dim, with_loss=True):
    super().__init__()
    self.encoder = Encoder(**ddconfig)
    self.decoder = Decoder(**ddconfig)
    if with_loss:
      self.loss = LossStandIn()
    self.quantize = VectorQuantizer(n_embed, embed_dim, beta=0.25)
    self.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
    self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

  def encode(self, x):
    return self.quantize(self.quant_conv(self.encoder(x)))

  def decode(self, quant):
    return self.decoder(self.post_quant_conv(quant))


class GumbelVQ(VQModel):

  def __init__(self, ddconfig, n_embed, embed_dim, kl_weight=1e-8, with_loss=True):
    super().__init__(ddconfig, n_embed, embed_dim, with_loss=with_loss)
    self.quantize = GumbelQuantize(ddconfig["z_channels"], embed_dim, n_embed=n_embed,
                                   kl_weight=kl_weight, temp_init=1.0)


class Net2NetTransformer(nn.Module):
  """Only the parts a checkpoint shows: ``first_stage_model`` and a ``transformer``."""

  def __init__(self, first_stage_model):
    super().__init__()
    self.first_stage_model = first_stage_model
    self.transformer = nn.Linear(4, 4)


class CodecEncoder(nn.Module):
  """The codec file's ``Encoder``: [0, 1] images -> flat full code indices."""

  def __init__(self, encoder, quant_conv, quantize):
    super().__init__()
    self.encoder, self.quant_conv, self.quantize = encoder, quant_conv, quantize

  @torch.no_grad()
  def forward(self, x):
    x = 2 * x - 1
    h = self.quant_conv(self.encoder(x))
    _, _, [_, _, indices] = self.quantize(h)
    return indices.view(x.shape[0], -1)


class CodecDecoder(nn.Module):
  """The codec file's ``Decoder``: full code indices -> [0, 1] images."""

  def __init__(self, decoder, post_quant_conv, quantize, w=16, h=16):
    super().__init__()
    self.decoder, self.post_quant_conv, self.quantize = decoder, post_quant_conv, quantize
    self.w, self.h = w, h

  @torch.no_grad()
  def forward(self, indices):
    z = self.quantize.get_codebook_entry(indices.view(-1),
                                         shape=(indices.shape[0], self.h, self.w, -1))
    x = torch.clamp(self.decoder(self.post_quant_conv(z)), -1., 1.)
    return (x + 1.) / 2.


class TamingCodec(nn.Module):
  """``TamingGumbelVQVAE`` / ``TamingVQVAE`` / ``TamingFFHQVQVAE`` around a loaded model."""

  def __init__(self, model, token_shape, quantize_number=0, full_to_quantize=None):
    super().__init__()
    self.enc = CodecEncoder(model.encoder, model.quant_conv, model.quantize)
    self.dec = CodecDecoder(model.decoder, model.post_quant_conv, model.quantize,
                            token_shape[0], token_shape[1])
    self.quantize_number = quantize_number
    if quantize_number != 0 and full_to_quantize is not None:
      self.full_to_quantize = full_to_quantize
      self.quantize_to_full = torch.zeros(quantize_number) - 1
      for idx, i in enumerate(self.full_to_quantize):
        if self.quantize_to_full[i] == -1:
          self.quantize_to_full[i] = idx
      self.quantize_to_full = self.quantize_to_full.long()
    self.token_shape = token_shape
    self.eval()

  def get_tokens(self, imgs):
    code = self.enc(imgs.div(255))
    if self.quantize_number != 0:
      code = self.full_to_quantize[code]
    return {"token": code}

  def decode(self, img_seq):
    if self.quantize_number != 0:
      img_seq = self.quantize_to_full[img_seq].type_as(img_seq)
    b, n = img_seq.shape
    img_seq = img_seq.reshape(b, int(math.sqrt(n)), -1)
    return self.dec(img_seq) * 255


class DALLE(nn.Module):
  """The official model's top level as its checkpoints show it: codec and transformer."""

  def __init__(self, content_codec):
    super().__init__()
    self.content_codec = content_codec
    self.transformer = nn.Linear(4, 4)
