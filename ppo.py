"""
PPO math for RL on language models: small pure functions of tensors and masks.

All per-token tensors are right-padded [B, T] over the *response* tokens only (the prompt is not
here); `mask` is 1.0 on real response tokens and 0.0 on the padding after them. The pieces, in the
order a training step uses them:

  logprobs_from_logits -> kl_penalty -> token_rewards -> compute_gae -> masked_whiten
  -> policy_loss / value_loss  (+ entropy_from_logits as a metric)

(train.py computes the log-probs and entropy through model.head_logprobs, the same numbers a chunk of positions at a
time, so the [B, T, V] logits are never held; logprobs_from_logits is their reference and the tests' yardstick.)

The critic-free estimators replace compute_gae (and the critic) by a baseline taken from the other
responses to the same prompt, then the plain discounted return:

  gae          PPO with a critic: GAE(gamma, lambda) of the per-token rewards, whitened (Med-RLVR;
               OpenRLHF 0.5.9's gae; train.py --no-whiten: not)
  grpo         score - group mean, / (group std + 1e-6) -> returns. With the KL in the reward (k1) this is
               OpenRLHF's group_norm (added after 0.5.9; its epsilon is 1e-9); DeepSeekMath's GRPO puts a k3 KL
               in the loss and averages per response (train.py --preset grpo); without the std, with a
               fixed-length loss and no KL, Dr. GRPO (--preset dr-grpo)
  rloo         score - mean of the group's *other* responses, per-token KL outside the baseline: OpenRLHF's
               rloo (less 0.5.9's batch whitening), not TRL's / Ahmadian et al.'s sequence-level form
  reinforce++  the score as it is, returns whitened over the batch (Hu 2025; OpenRLHF 0.5.9's "reinforce"; or not)
  (group_scores, then token_rewards, then discounted_returns; reinforce++ then masked_whiten)

Modelled on OpenRLHF (models/utils.py, models/loss.py, experience_maker.py), which Med-RLVR used, and
TinyZero's verl/trainer/ppo/core_algos.py. Deliberate simplifications: a fixed KL coefficient beta
(no adaptive KL controller), no dual-clip PPO, no reward clipping or value normalisation.
"""
import torch

# -----------------------------------------------------------------------------
# masked statistics

def masked_mean(x, mask, dim=None):
    """Mean of x over the entries where mask is 1. x, mask: [B, T]; dim=None -> scalar."""
    # torch.where (not x * mask) so that inf/NaN garbage on padding cannot leak into the sum
    total = torch.where(mask.bool(), x, torch.zeros_like(x)).sum(dim=dim)
    return total / mask.sum(dim=dim).clamp(min=1)  # an empty row gives 0, not NaN

def masked_whiten(x, mask, shift_mean=True, all_sum=None):
    """(x - mean) / sqrt(var + 1e-8) over the masked entries of the whole batch; padding -> 0.
    Uses the *biased* variance (divide by N), as OpenRLHF's advantage normalisation does;
    TinyZero/verl's masked_whiten uses the unbiased one (N-1). The difference is negligible
    for thousands of tokens. Call it on the whole rollout batch, before splitting into minibatches.
    all_sum: a function that sums a tensor over the ranks in place (torch.distributed.all_reduce), to whiten over
    every rank's tokens together; None: this batch alone."""
    xd, m = x.double(), mask.double()  # fp64 sums: over ~10^5 tokens fp32 rounding alone would whiten equal values into noise
    total = torch.stack([(xd * m).sum(), m.sum()])
    if all_sum:
        all_sum(total)
    mean = total[0] / total[1]
    sq = (((xd - mean) ** 2) * m).sum()[None]  # two passes: E[x^2] - mean^2 can come out negative
    if all_sum:
        all_sum(sq)
    whitened = (xd - mean) * torch.rsqrt(sq[0] / total[1] + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened)).to(x.dtype)

# -----------------------------------------------------------------------------
# log-probs, entropy, KL

def logprobs_from_logits(logits, tokens, temperature=1.0):
    """log softmax(logits / temperature) at `tokens`. logits: [B, T, V], tokens: [B, T] -> [B, T] fp32.
    The training log-probs must use the same temperature as the rollout: the tokens were sampled
    from softmax(logits / temperature), so that is the policy whose ratio and KL we measure."""
    out = []
    for row_logits, row_tokens in zip(logits, tokens):  # one row at a time: one [T, V] fp32 copy at a time (without grad)
        row = row_logits.float() / temperature  # out of place: never modify the caller's logits
        picked = row.gather(-1, row_tokens.unsqueeze(-1)).squeeze(-1)  # [T]
        out.append(picked - torch.logsumexp(row, dim=-1))  # log_softmax(x)_i = x_i - logsumexp(x), no [T, V] output
    return torch.stack(out)  # [B, T]

def entropy_from_logits(logits):
    """Entropy of softmax(logits) per position. logits: [B, T, V] -> [B, T]. For the metric only.
    H = logsumexp(z) - sum_i p_i z_i, which is stable for large logits (no log of a tiny p)."""
    out = []
    for row in logits:  # one row at a time, as logprobs_from_logits: bounds the fp32 copies to [T, V]
        row = row.float()
        out.append(torch.logsumexp(row, dim=-1) - (torch.softmax(row, dim=-1) * row).sum(dim=-1))
    return torch.stack(out)

def kl_penalty(logprobs, ref_logprobs, kind="k1"):
    """Per-token estimate of KL(policy || ref) from tokens sampled by the policy (Schulman, 'Approximating
    KL divergence'). logprobs, ref_logprobs: [B, T] -> [B, T].
      k1 = logp - ref_logp                      unbiased, can be negative per token; OpenRLHF's default
      k2 = 0.5 * (logp - ref_logp)^2            biased, >= 0
      k3 = exp(ref - logp) - (ref - logp) - 1   unbiased and >= 0, lower variance
    As a loss term (differentiated through logp), their gradients are, in expectation over tokens drawn
    from the current policy at one position: k1's zero (useless as a loss), k2's the gradient of
    KL(policy || ref), k3's the gradient of KL(ref || policy). (Summed over a sequence they miss the
    score-function terms of later positions, and after the first minibatch the tokens are off-policy.)"""
    if kind == "k1":
        return logprobs.float() - ref_logprobs.float()
    if kind == "k2":
        return 0.5 * (logprobs.float() - ref_logprobs.float()) ** 2
    if kind == "k3":
        # clamp the log-ratio so exp() cannot overflow to inf when the policies have drifted far apart
        log_ratio = (ref_logprobs.float() - logprobs.float()).clamp(-20.0, 20.0)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl_penalty: unknown kind {kind!r}, expected 'k1', 'k2' or 'k3'")

# -----------------------------------------------------------------------------
# rewards and advantages

def token_rewards(scores, kl, mask, beta):
    """Per-token rewards [B, T]: -beta * kl on every response token, plus the scalar score [B] of each
    response on its last real token (found from the mask, not from token ids, so a response truncated
    at max length without EOS still gets its score). This is where the KL penalty goes: into the
    reward, as OpenRLHF does (k1 by default), so the critic and GAE see it; it is not a loss term."""
    if not mask.bool().any(dim=1).all():
        raise ValueError("token_rewards: some row of `mask` has no response token to put its score on")
    T = mask.size(1)
    last = T - 1 - mask.long().flip(1).argmax(dim=1, keepdim=True)  # [B, 1] index of the last 1 in each row
    score_tok = torch.zeros_like(kl, dtype=torch.float32).scatter(1, last, scores.float().unsqueeze(1))  # [B, T]
    return torch.where(mask.bool(), score_tok - beta * kl.float(), torch.zeros_like(score_tok))

@torch.no_grad()
def compute_gae(rewards, values, mask, gamma, lam):
    """Generalised Advantage Estimation on right-padded rows. rewards, values, mask: [B, T].
    Returns raw (un-whitened) advantages [B, T] and returns = advantages + values [B, T]; both are 0
    on padding. Values after the last real token count as 0: the episode ends there, so there is
    nothing to bootstrap from."""
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"compute_gae: shapes differ: rewards {tuple(rewards.shape)}, "
                         f"values {tuple(values.shape)}, mask {tuple(mask.shape)}")
    m = mask.bool()
    rewards = torch.where(m, rewards.float(), 0.0)  # [B, T]
    values = torch.where(m, values.float(), 0.0)  # [B, T], zeroed after the end -> V(terminal) = 0
    B, T = rewards.shape
    next_value = torch.zeros(B, device=rewards.device)  # [B]
    next_adv = torch.zeros(B, device=rewards.device)  # [B]
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(T)):  # loop over time, vectorised over the batch
        delta = rewards[:, t] + gamma * next_value - values[:, t]  # TD error, [B]
        next_adv = delta + gamma * lam * next_adv  # on padding r = V = 0, so delta = 0 and it stays 0
        advantages[:, t] = next_adv
        next_value = values[:, t]
    return advantages, advantages + values

# -----------------------------------------------------------------------------
# critic-free advantages

def group_scores(scores, group_size, kind, scale_by_std=True, eps=1e-6):
    """Scores [B] of consecutive groups of `group_size` responses to one prompt, minus a baseline from their
    group -> [B]. The baseline needs no critic: the other responses to the same prompt are the estimate.
      grpo: (r - mean) / (std + eps), std unbiased as OpenRLHF and verl; scale_by_std=False: r - mean (Dr. GRPO)
      rloo: r - mean of the other group_size - 1 = group_size / (group_size - 1) * (r - mean)
    In fp64, and each group shifted by its first score first (the mean moves with it, the std does not): a
    group of equal scores then gives advantages of exactly 0 for any reward values, where fp32's mean of
    fifteen 0.7s is off by ~1e-8 and dividing by a std of ~1e-8 made it +-0.1."""
    if group_size < 2 or scores.numel() % group_size:
        raise ValueError(f"group_scores: {scores.numel()} scores do not form groups of {group_size} >= 2")
    r = scores.double().view(-1, group_size)  # [prompts, group_size]
    r = r - r[:, :1]
    mean = r.mean(dim=1, keepdim=True)
    if kind == "grpo":
        shifted = (r - mean) / (r.std(dim=1, keepdim=True) + eps) if scale_by_std else r - mean
    elif kind == "rloo":
        shifted = (r - mean) * group_size / (group_size - 1)
    else:
        raise ValueError(f"group_scores: unknown kind {kind!r}, expected 'grpo' or 'rloo'")
    return shifted.view(-1).float()

@torch.no_grad()
def discounted_returns(rewards, mask, gamma):
    """Return-to-go G_t = r_t + gamma * G_{t+1} of per-token rewards on right-padded rows [B, T] -> [B, T];
    0 on padding. The advantage of every critic-free estimator: with the score on the last token and gamma 1,
    every token of a response gets its (baseline-shifted) score minus the KL still to come."""
    rewards = torch.where(mask.bool(), rewards.float(), 0.0)
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], device=rewards.device)  # [B]
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return torch.where(mask.bool(), returns, 0.0)

# -----------------------------------------------------------------------------
# losses
#
# How the losses are averaged over the per-token losses [B, T] (`agg`):
#   "token"  a token-mean over every response token of the (mini)batch, masked_mean(loss, mask): every
#            token weighs the same, so a long response weighs more in total. verl/TinyZero's
#            "token-mean", DAPO's token-level loss, OpenRLHF's token_level_loss (its later default).
#   "seq"    the mean within each response, then over responses: every response weighs the same
#            whatever its length. OpenRLHF 0.5.9's PolicyLoss and ValueLoss (masked_mean(loss, mask,
#            dim=-1).mean()), DeepSeekMath's GRPO; the med-rlvr preset.
#   "fixed"  the token sum divided by B * horizon (the response budget, max_new_tokens): no length
#            normalisation at all, a constant divisor (Dr. GRPO).

def aggregate(per_token, mask, agg="token", horizon=None):
    if agg == "token":
        return masked_mean(per_token, mask)
    if agg == "seq":
        return masked_mean(per_token, mask, dim=-1).mean()
    if agg == "fixed":
        return torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum() / (mask.shape[0] * horizon)
    raise ValueError(f"aggregate: unknown agg {agg!r}, expected 'token', 'seq' or 'fixed'")

def policy_loss(logprobs, old_logprobs, advantages, mask, clip_eps=0.2, agg="token", horizon=None):
    """PPO clipped surrogate: -min(r * A, clip(r, 1 - eps, 1 + eps) * A) with r = pi / pi_old.
    logprobs (with grad), old_logprobs, advantages, mask: [B, T].
    Returns (loss, clip_frac, approx_kl): scalar loss, the fraction of tokens where the clip is
    active (zero gradient there), and the k1 KL(old || new) as a metric."""
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # ours: keeps exp() finite (OpenRLHF, TinyZero don't clamp)
    ratio = torch.exp(log_ratio)  # [B, T]
    surr1 = ratio * advantages
    surr2 = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    loss = aggregate(-torch.min(surr1, surr2), mask, agg, horizon)
    with torch.no_grad():
        clip_frac = masked_mean((surr2 < surr1).float(), mask)
        approx_kl = masked_mean(-log_ratio, mask)
    return loss, clip_frac, approx_kl

def value_loss(values, old_values, returns, mask, clip_eps=0.2, agg="token", horizon=None):
    """Clipped value loss 0.5 * max((v - R)^2, (v_clip - R)^2), v_clip = v_old + clamp(v - v_old, -eps, eps).
    values (with grad), old_values, returns, mask: [B, T] -> scalar. clip_eps=None: plain 0.5 * (v - R)^2."""
    err = (values - returns) ** 2  # [B, T]
    if clip_eps is not None:
        v_clip = old_values + (values - old_values).clamp(-clip_eps, clip_eps)
        err = torch.max(err, (v_clip - returns) ** 2)
    return 0.5 * aggregate(err, mask, agg, horizon)
