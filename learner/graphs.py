"""TD3's update as CUDA graphs: captured once, replayed for each draw.

An eager update launches a few hundred kernels, each from Python: on a fast GPU the
host's launch time, not the device, sets the rate (LeanRL measured TD3 on an H100 at
272 updates/s eager and 936 with CUDA graphs). Here the whole update is captured:
the gather from the device's frames, the shift, forward and backward, clipping,
both optimizer steps (fused, capturable Adam), the target updates and the metric
row. Two graphs: an update of the critic alone, and one of the critic, the actor
and the targets (every ``policy_delay``-th). Their inputs are static tensors that
each draw's slots, actions, rewards and discounts are copied into (kilobytes, through
the agent's counting gate); their output is the metric row, cloned after each
replay so the learner reads it later, with its neighbours'.

The eager update (:meth:`learner.td3.TD3Agent.update_deferred`) stays the reference
and still runs: the first :data:`WARMUP` updates of each kind (eagerly, on a side
stream, as a capture needs: lazy initialisation, the optimizers' state), updates
with detailed metrics (they copy the parameters), and any batch that is not a draw
of the batch size captured. ``tests/learner/test_graphs.py`` holds replays equal to
eager updates from the same state and seeds where a GPU is present.
"""

from __future__ import annotations

import torch

from learner.replay import Draw
from learner.td3 import metric_row

WARMUP = 3  # eager updates of each kind before it is captured


class GraphedUpdates:
    """The agent's updates, replayed from CUDA graphs where they can be (same interface as the agent's)."""

    def __init__(self, agent, record=None, lock=None):
        """``record``: how an update's body is captured, ``record(body) -> run``, where ``run()`` does the update
        and returns the body's ``(keys, values)``; a CUDA graph's replay unless given (a test on a CPU gives the
        body itself, to hold the inputs' plumbing to the eager update where no graph can be captured). ``lock``:
        the replay's lock, held through a capture, so that the receive thread stages (pins host memory) no frames
        meanwhile."""
        if record is None and (agent.frames is None or not agent.graphed):
            raise ValueError("graphed updates need the frames on a CUDA device (learner.frames) and "
                             "learner.cuda_graph")
        self.agent = agent
        self.record = record or cuda_graph
        self.lock = lock
        self.graphs: dict[bool, tuple] = {}  # actor step or not -> (run, inputs)
        self.eager = {False: 0, True: 0}
        self.side = torch.cuda.Stream(agent.device) if agent.device.type == "cuda" else None
        self.replays = 0

    def update_deferred(self, batch, detailed: bool = False) -> tuple[tuple[str, ...], torch.Tensor]:
        agent = self.agent
        actor = agent.actor_due()
        if detailed or not isinstance(batch, Draw) or batch.augmented:
            return agent.update_deferred(batch, detailed)
        if self.eager[actor] < WARMUP:
            self.eager[actor] += 1
            if self.side is None:
                return agent.update_deferred(batch)
            current = torch.cuda.current_stream(agent.device)
            self.side.wait_stream(current)
            with torch.cuda.stream(self.side):
                out = agent.update_deferred(batch)
            current.wait_stream(self.side)
            return out
        if actor not in self.graphs:
            if self.lock is None:
                self.graphs[actor] = self.capture(batch, actor)
            else:
                with self.lock:
                    self.graphs[actor] = self.capture(batch, actor)
        run, inputs = self.graphs[actor]
        if inputs["reward"].shape[0] != len(batch.reward):  # another batch size than captured
            return agent.update_deferred(batch)
        agent.frames.ready_for(batch)
        self.fill(inputs, batch)
        keys, out = run()
        agent.updates += 1
        self.replays += 1
        return keys, out.clone()

    def fill(self, inputs: dict[str, torch.Tensor], draw: Draw) -> None:
        copies, frames = self.agent.copies, self.agent.frames
        copies.copy(frames.slots(draw), into=inputs["idx"])
        for name in ("action", "reward", "discount"):
            copies.copy(getattr(draw, name), into=inputs[name])

    def capture(self, draw: Draw, actor: bool) -> tuple:
        """One update of its kind recorded (as a graph: captured, not run) on static inputs shaped as ``draw``'s."""
        agent = self.agent
        n, k = draw.obs_slots.shape
        slots = agent.frames.slots(draw)
        dev = agent.device
        inputs = {"idx": torch.zeros(slots.shape, dtype=torch.from_numpy(slots[:0]).dtype, device=dev),
                  "action": torch.zeros(draw.action.shape, dtype=torch.float32, device=dev),
                  "reward": torch.zeros(n, dtype=torch.float32, device=dev),
                  "discount": torch.zeros(n, dtype=torch.float32, device=dev)}
        # gradients allocated inside the capture, from the graph's own memory, at the addresses its steps read
        agent.critic_opt.zero_grad(set_to_none=True)
        agent.actor_opt.zero_grad(set_to_none=True)

        def body():
            obs, next_obs = agent.frames.gather(inputs["idx"], n, k)
            return metric_row(agent.step({"obs": obs, "next_obs": next_obs, "action": inputs["action"],
                                          "reward": inputs["reward"], "discount": inputs["discount"]}, False, actor))

        return self.record(body), inputs


def cuda_graph(body):
    """``body`` captured as a CUDA graph (captured, not run); returns a call that replays the graph and returns
    the body's outputs, which each replay rewrites in place."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: what other threads do with CUDA meanwhile (the heartbeat's memory reads) neither joins the
    # graph nor voids the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        result = body()

    def run():
        graph.replay()
        return result

    return run
