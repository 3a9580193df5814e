"""The planner: devices and layer ranges by dynamic programming, and client/server splits."""

from shardwise.planner.collaborative import SplitResult, split_client_server, split_frontier
from shardwise.planner.partition import CostTable, PlanResult, solve

__all__ = ["CostTable", "PlanResult", "SplitResult", "solve", "split_client_server", "split_frontier"]
