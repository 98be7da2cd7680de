//! The expert-parallel token exchange: its layout, its plans and their cost.
//!
//! Expert parallelism moves every routed token to the ranks that hold its experts and the
//! expert outputs back. The ranks of the EP group sit `ranks_per_node` to a node (rank `r` on
//! node `r / ranks_per_node`); each rank holds `slots_per_rank` expert slots (slot `s` on rank
//! `s / slots_per_rank`), filled by a placement (`phy2log`, replicas allowed). Tokens address
//! slots, never logical experts: the replica of each (token, expert) is chosen before planning.
//!
//! * [`dispatch_layout`]: what one rank sends, from its tokens' slot ids (the analogue of DeepEP's
//!   `get_dispatch_layout`): copies per slot, tokens per destination rank and per destination
//!   node, the token-in-rank map and the node-grouped send order.
//! * [`plan`]: from the layouts of every rank (all-gathered), the exact rows each rank sends to
//!   each rank at each stage of the four strategies, their bytes per link class and the rows
//!   that cross node boundaries.
//! * [`cost`]: an α-β cost model of a plan; `auto` picks the cheapest strategy.
//! * [`route`]: one rank's route of one exchange (every hop's indices and row counts), built
//!   in one call from its slots and the plan; the dispatch, the combine and their backwards
//!   move rows by it.
//! * [`exec`]: the index computations the route is made of (copy rows, block reorders, the
//!   forwarding and output orders read off the slot ids that arrive with token rows).
//!
//! The strategies ([`Strategy`]):
//!
//! 1. `flat`: one all-to-all-v over the group, one row per (token, slot) copy. Its splits are
//!    Megatron-Core's `MoEAlltoAllTokenDispatcher` numbers (`input_splits`, `output_splits`,
//!    `num_global_tokens_per_local_expert`).
//! 2. `2dh` (Tutel's two-dimensional hierarchical all-to-all): the copies first regroup inside
//!    the node by the destination's local rank, then cross the network between ranks of the same
//!    local rank: the same bytes between nodes as `flat`, in `nodes - 1` messages a rank instead
//!    of `ranks - ranks_per_node`.
//! 3. `dedup` (DeepEP's two-hop path): a token crosses the network once per destination node, to
//!    the rank of its own local rank there, which forwards it once per destination rank inside
//!    the node; the destination expands it to its slots. The combine sums a rank's copies, then
//!    a node's partial sums, before the single trip back.
//! 4. `allgather` (MindSpeed's hierarchical all-to-all-v): every token goes to every node (an
//!    all-gather among ranks of the same local rank), each node keeps its slots' tokens and
//!    forwards them inside the node as `dedup` does; the combine returns every token's partial
//!    sum (a reduce-scatter).
//!
//! Rows of the exchange carry the hidden state and, in the dispatch, the routing weights: one
//! weight a row for the copy strategies (`flat`, `2dh`), the token's `entries` weights and slot
//! ids for the token strategies (`dedup`, `allgather`). [`plan::RowFormat`] gives their exact
//! byte layout, so planned bytes are the bytes sent.

pub mod cost;
pub mod dispatch_layout;
pub mod exec;
pub mod plan;
pub mod route;

use crate::error::{ensure, invalid, Result};

/// The EP group: `ranks` ranks, `ranks_per_node` to a node, `slots_per_rank` expert slots each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EpGroup {
    pub ranks: usize,
    pub ranks_per_node: usize,
    pub slots_per_rank: usize,
}

impl EpGroup {
    /// Checks the sizes; errors name the argument at fault.
    pub fn new(ranks: usize, ranks_per_node: usize, slots_per_rank: usize) -> Result<Self> {
        ensure(ranks >= 1, "ep_size", || {
            format!("must be >= 1, got {ranks}")
        })?;
        ensure(
            ranks_per_node >= 1 && ranks % ranks_per_node == 0,
            "ranks_per_node",
            || format!("must be >= 1 and divide the EP size ({ranks}), got {ranks_per_node}"),
        )?;
        ensure(slots_per_rank >= 1, "num_local_experts", || {
            format!("every rank needs at least one expert slot, got {slots_per_rank}")
        })?;
        ensure(
            ranks
                .checked_mul(slots_per_rank)
                .is_some_and(|r| r < i32::MAX as usize),
            "num_local_experts",
            || format!("{ranks} ranks x {slots_per_rank} slots overflow 32-bit slot ids"),
        )?;
        Ok(Self {
            ranks,
            ranks_per_node,
            slots_per_rank,
        })
    }

    /// Nodes in the group.
    #[inline]
    pub fn nodes(&self) -> usize {
        self.ranks / self.ranks_per_node
    }

    /// Expert slots in the group (R).
    #[inline]
    pub fn slots(&self) -> usize {
        self.ranks * self.slots_per_rank
    }

    #[inline]
    pub fn node(&self, rank: usize) -> usize {
        rank / self.ranks_per_node
    }

    #[inline]
    pub fn local(&self, rank: usize) -> usize {
        rank % self.ranks_per_node
    }

    #[inline]
    pub fn rank(&self, node: usize, local: usize) -> usize {
        node * self.ranks_per_node + local
    }

    #[inline]
    pub fn rank_of_slot(&self, slot: usize) -> usize {
        slot / self.slots_per_rank
    }

    /// `rank -> node` for every rank, and `slot -> rank` for every slot: tables for the hot
    /// loops (a lookup instead of a division per routed token).
    pub(crate) fn tables(&self) -> (Vec<u32>, Vec<u32>) {
        let rank_node = (0..self.ranks).map(|r| self.node(r) as u32).collect();
        let slot_rank = (0..self.slots())
            .map(|s| self.rank_of_slot(s) as u32)
            .collect();
        (rank_node, slot_rank)
    }
}

/// How the tokens travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Strategy {
    Flat,
    TwoLevel,
    Dedup,
    AllGather,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Flat,
        Strategy::TwoLevel,
        Strategy::Dedup,
        Strategy::AllGather,
    ];

    /// `"flat"`, `"2dh"`, `"dedup"` or `"allgather"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "flat" => Ok(Self::Flat),
            "2dh" => Ok(Self::TwoLevel),
            "dedup" => Ok(Self::Dedup),
            "allgather" => Ok(Self::AllGather),
            _ => Err(invalid(
                "strategy",
                format!("expected 'auto', 'flat', '2dh', 'dedup' or 'allgather', got '{s}'"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Flat => "flat",
            Self::TwoLevel => "2dh",
            Self::Dedup => "dedup",
            Self::AllGather => "allgather",
        }
    }

    /// Whether rows are (token, slot) copies (else one row per token and destination).
    pub fn copy_rows(self) -> bool {
        matches!(self, Self::Flat | Self::TwoLevel)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_checks() {
        let t = EpGroup::new(8, 4, 3).unwrap();
        assert_eq!((t.nodes(), t.slots()), (2, 24));
        assert_eq!((t.node(5), t.local(5), t.rank(1, 1)), (1, 1, 5));
        assert_eq!(t.rank_of_slot(23), 7);
        assert!(EpGroup::new(8, 3, 1).is_err());
        assert!(EpGroup::new(8, 0, 1).is_err());
        assert!(EpGroup::new(8, 8, 0).is_err());
        for s in Strategy::ALL {
            assert_eq!(Strategy::parse(s.name()).unwrap(), s);
        }
        assert!(Strategy::parse("ring").is_err());
    }
}
