"""GCN over a fixed pixel-grid graph (Kipf & Welling 2017): the reference GNN of tasks.models."""

from __future__ import annotations

import itertools
import warnings

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from strategies.sparse.units import Consumer, UnitGroup
from tasks.model_shapes import image_shape


def grid_edge_index(h: int, w: int) -> torch.Tensor:
    """Directed edges of the 8-neighbour grid over h x w pixels: [2, E], node id = r*w + c."""
    src: list[int] = []
    dst: list[int] = []
    for r, c in itertools.product(range(h), range(w)):
        for dr, dc in itertools.product((-1, 0, 1), repeat=2):
            rr, cc = r + dr, c + dc
            if (dr, dc) != (0, 0) and 0 <= rr < h and 0 <= cc < w:
                src.append(r * w + c)
                dst.append(rr * w + cc)
    return torch.tensor([src, dst], dtype=torch.long)


def gcn_normalized_adjacency(edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
    """Sparse CSR  D^-1/2 (A + I) D^-1/2  (Kipf & Welling 2017) of an undirected graph."""
    loops = torch.arange(num_nodes).repeat(2, 1)  # [2, N] self loops
    ei = torch.cat([edge_index, loops], dim=1)  # [2, E + N]
    deg = torch.bincount(ei[1], minlength=num_nodes).to(torch.float32)  # [N]
    inv_sqrt = deg.pow(-0.5)
    values = inv_sqrt[ei[0]] * inv_sqrt[ei[1]]  # [E + N]
    coo = torch.sparse_coo_tensor(ei, values, (num_nodes, num_nodes), check_invariants=True)
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and tested here
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


class GridGNN(nn.Module):
    """GCN layers (Kipf & Welling 2017, PyG GCNConv) over a fixed 8-neighbour pixel-grid graph.

    forward takes a plain [B, C, H, W] (or [B, F]) batch: each image is one graph with H*W
    nodes whose features are [intensity per channel, row/H, col/W]. The B graphs are batched
    PyG-style by offsetting the grid's edge_index by i*H*W, and the normalised block-diagonal
    adjacency is cached per batch size as a sparse CSR matrix: the same maths as GCNConv's own
    normalisation, but sparse-matrix products are ~7x faster on CPU than edge-wise scatter.

    Readout: mean+max pooling alone loses where strokes are, so the graph embedding also
    includes a linear map of the flattened (narrow) node embeddings, which keeps accuracy.
    """

    edge_index: torch.Tensor  # [2, E] buffer: one grid graph
    coords: torch.Tensor  # [N, 2] buffer: (row/H, col/W) of every node

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        hidden: int = 32,
        num_layers: int = 2,
        node_proj: int = 4,
        readout: int = 64,
    ) -> None:
        super().__init__()
        from torch_geometric.nn import GCNConv  # heavy import, only when a GNN is built

        c, h, w = image_shape(input_shape, "gnn")
        self.channels, self.h, self.w = c, h, w
        self.num_nodes = h * w
        # Buffers (not persistent): derived from the shape, so never sent over the wire.
        self.register_buffer("edge_index", grid_edge_index(h, w), persistent=False)  # [2, E]
        rows = torch.arange(h, dtype=torch.float32).repeat_interleave(w) / max(h, 1)  # [N]
        cols = torch.arange(w, dtype=torch.float32).repeat(h) / max(w, 1)  # [N]
        self.register_buffer("coords", torch.stack([rows, cols], dim=1), persistent=False)
        dims = [c + 2] + [hidden] * num_layers
        # normalize=False: we pass the already-normalised adjacency (cached per batch size).
        self.convs = nn.ModuleList(
            GCNConv(dims[i], dims[i + 1], normalize=False) for i in range(num_layers)
        )
        self.node_proj = nn.Linear(hidden, node_proj)  # per-node [hidden] -> [node_proj]
        self.flat = nn.Linear(self.num_nodes * node_proj, readout)
        self.head = nn.Linear(2 * hidden + readout, num_classes)
        self._adj: dict[tuple[int, str], torch.Tensor] = {}

    def __getstate__(self) -> dict[str, object]:
        # Sparse CSR tensors cannot be deep-copied or pickled; the cache is rebuilt on demand.
        state = dict(self.__dict__)
        state["_adj"] = {}
        return state

    def _batched_adjacency(self, b: int, device: torch.device) -> torch.Tensor:
        key = (b, str(device))
        if key not in self._adj:
            ei = self.edge_index  # [2, E]
            offsets = torch.arange(b, device=ei.device).repeat_interleave(ei.shape[1])
            batched = ei.repeat(1, b) + offsets * self.num_nodes  # [2, B*E] offset edge_index
            adj = gcn_normalized_adjacency(batched.cpu(), b * self.num_nodes).to(device)
            if len(self._adj) > 8:  # train + eval + ragged last batches; keep memory bounded
                self._adj.clear()
            self._adj[key] = adj
        return self._adj[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        pixels = x.reshape(b, self.channels, self.num_nodes).transpose(1, 2)  # [B, N, C]
        coords = self.coords.unsqueeze(0).expand(b, -1, -1)  # [B, N, 2]
        z = torch.cat([pixels, coords], dim=2).reshape(b * self.num_nodes, -1)  # [B*N, C+2]
        adj = self._batched_adjacency(b, x.device)
        for conv in self.convs:
            z = F.relu(conv(z, adj))  # [B*N, hidden]
        z = z.reshape(b, self.num_nodes, -1)  # [B, N, hidden]
        pooled = torch.cat([z.mean(dim=1), z.amax(dim=1)], dim=1)  # [B, 2*hidden]
        flat = F.relu(self.flat(self.node_proj(z).flatten(1)))  # [B, N*node_proj] -> [B, readout]
        return self.head(torch.cat([pooled, flat], dim=1))  # [B, classes]

    def unit_groups(self) -> list[UnitGroup]:
        """GCN layer i -> layer i+1; the last GCN -> head (mean and max blocks) and node_proj;
        node_proj -> flat (flattened [N, node_proj]: interleaved); flat -> head."""
        n_conv = len(self.convs)
        hidden = self.node_proj.in_features
        groups = [
            UnitGroup(
                f"convs.{i}.lin.weight",
                (f"convs.{i}.bias",),
                (),
                (Consumer(f"convs.{i + 1}.lin.weight"),),
            )
            for i in range(n_conv - 1)
        ]
        last = n_conv - 1
        readers = (
            Consumer("head.weight"),
            Consumer("head.weight", offset=hidden),
            Consumer("node_proj.weight"),
        )
        groups.append(UnitGroup(f"convs.{last}.lin.weight", (f"convs.{last}.bias",), (), readers))
        flat_in = (Consumer("flat.weight", spatial=self.num_nodes, layout="interleaved"),)
        groups.append(UnitGroup("node_proj.weight", ("node_proj.bias",), (), flat_in))
        head_in = (Consumer("head.weight", offset=2 * hidden),)
        groups.append(UnitGroup("flat.weight", ("flat.bias",), (), head_in))
        return groups
