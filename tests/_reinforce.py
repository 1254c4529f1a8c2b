"""Notebook 03's REINFORCE on CartPole (notebooks/03_policy_gradient.ipynb), as a
function of the optimizer: its training loop, with the mean return of each
iteration passed to the optimizer as ``value=``. Constants, policy, rollouts
and surrogate are the notebook's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

GRAVITY, CART_MASS, POLE_MASS, HALF_LENGTH, FORCE, DT = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS = CART_MASS + POLE_MASS
X_LIMIT, THETA_LIMIT, MAX_STEPS = 2.4, 12 * 2 * np.pi / 360, 500
GAMMA, EPISODES_PER_ITERATION, ITERATIONS = 0.99, 32, 100


def physics(state, action):
  x, x_dot, theta, theta_dot = state
  force = jnp.where(action == 1, FORCE, -FORCE)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  temp = (force + POLE_MASS * HALF_LENGTH * theta_dot**2 * sin) / TOTAL_MASS
  theta_acc = (GRAVITY * sin - cos * temp) / (
      HALF_LENGTH * (4.0 / 3.0 - POLE_MASS * cos**2 / TOTAL_MASS))
  x_acc = temp - POLE_MASS * HALF_LENGTH * theta_acc * cos / TOTAL_MASS
  state = jnp.stack([x + DT * x_dot, x_dot + DT * x_acc,
                     theta + DT * theta_dot, theta_dot + DT * theta_acc])
  fell = (jnp.abs(state[0]) > X_LIMIT) | (jnp.abs(state[2]) > THETA_LIMIT)
  return state, fell


def init_policy(key, hidden=32):
  k1, k2 = jax.random.split(key)
  return {"w1": 0.5 * jax.random.normal(k1, (4, hidden)), "b1": jnp.zeros(hidden),
          "w2": 0.01 * jax.random.normal(k2, (hidden, 2)), "b2": jnp.zeros(2)}


def policy_logits(params, obs):
  return jnp.tanh(obs @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def episode(params, key):
  key, reset_key = jax.random.split(key)

  def step(carry, key):
    state, alive = carry
    action = jax.random.categorical(key, policy_logits(params, state))
    new_state, fell = physics(state, action)
    return (new_state, alive & ~fell), (state, action, alive)

  init = (jax.random.uniform(reset_key, (4,), minval=-0.05, maxval=0.05), jnp.array(True))
  _, (obs, actions, alive) = jax.lax.scan(step, init, jax.random.split(key, MAX_STEPS))
  return obs, actions, alive.astype(jnp.float32)


def returns_to_go(rewards):
  def back(total, reward):
    total = reward + GAMMA * total
    return total, total
  return jax.lax.scan(back, 0.0, rewards, reverse=True)[1]


def surrogate(params, obs, actions, advantages):
  log_probs = jax.nn.log_softmax(policy_logits(params, obs))
  chosen = jnp.take_along_axis(log_probs, actions[..., None], axis=-1)[..., 0]
  return jnp.sum(chosen * advantages) / obs.shape[0]


def train(tx, seed):
  """The notebook's 100 iterations from policy ``seed``; returns the mean return
  of each iteration's 32 episodes and the final optimizer state."""

  def iteration(carry, key):
    params, opt_state = carry
    keys = jax.random.split(key, EPISODES_PER_ITERATION)
    obs, actions, alive = jax.vmap(episode, (None, 0))(params, keys)
    to_go = jax.vmap(returns_to_go)(alive)
    baseline = jnp.sum(to_go * alive, 0) / jnp.maximum(jnp.sum(alive, 0), 1)
    advantages = (to_go - baseline) * alive
    advantages /= jnp.sqrt(jnp.sum(advantages**2) / jnp.sum(alive)) + 1e-8
    grads = jax.grad(surrogate)(params, obs, actions, advantages)
    mean_return = jnp.mean(jnp.sum(alive, axis=1))
    updates, opt_state = tx.update(grads, opt_state, params, value=mean_return)
    return (optax.apply_updates(params, updates), opt_state), mean_return

  params = init_policy(jax.random.fold_in(jax.random.key(0), seed))
  keys = jax.random.split(jax.random.fold_in(jax.random.key(1), seed), ITERATIONS)
  (_, opt_state), curve = jax.lax.scan(iteration, (params, tx.init(params)), keys)
  return curve, opt_state
