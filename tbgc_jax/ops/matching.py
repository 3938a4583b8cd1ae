"""Bipartite matching of queries to padded targets, for set-prediction losses (DETR family)."""

import jax
import jax.numpy as jnp
import optax


def hungarian_match(cost: jax.Array, target_valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Matches each valid target to a distinct query at minimum total cost.

  Runs inside `jax.jit` (``optax.assignment.hungarian_algorithm``, no host callback); vmap it
  over a batch. Padded targets get a constant cost column: whatever queries they take, the
  valid targets' assignment is the optimum among the remaining queries, which is the
  optimum of the unpadded problem because there are at least as many queries as targets.

  Args:
    cost: ``[Q, T]`` matching cost of query ``q`` for target ``t``, ``Q >= T``. Non-finite
      entries are treated as very expensive.
    target_valid: ``[T]`` bool, False for padding targets.

  Returns:
    ``(query_of_target, target_of_query)``: ``[T]`` int32 index of the query matched to each
    target (meaningless where ``target_valid`` is False), and ``[Q]`` int32 index of the
    valid target matched to each query, or -1.
  """
  num_queries, num_targets = cost.shape
  if num_queries < num_targets:
    raise ValueError(
        f"hungarian_match needs at least as many queries as targets, got cost {cost.shape}")
  cost = jnp.nan_to_num(cost.astype(jnp.float32), nan=1e8, posinf=1e8, neginf=-1e8)
  cost = jnp.where(target_valid[None, :], cost, 0.0)
  rows, cols = optax.assignment.hungarian_algorithm(cost)
  query_of_target = jnp.zeros((num_targets,), jnp.int32).at[cols].set(rows.astype(jnp.int32))
  matched_target = jnp.where(target_valid[cols], cols, -1).astype(jnp.int32)
  target_of_query = jnp.full((num_queries,), -1, jnp.int32).at[rows].set(matched_target)
  return query_of_target, target_of_query
