//! The α-β cost model of an exchange stage, aligned with the migration model
//! ([`crate::balance::migration::LinkModel`]): per rank, the busier of its intra-node and
//! inter-node directions at the link bandwidth, plus a latency per message, plus its local
//! copies at the memory bandwidth; per node, the network bytes through the node's NICs. A stage
//! takes its slowest rank or node, plus a fixed overhead; stages run one after the other.
//!
//! ```text
//! t(stage) = overhead + max( max_r [ max(intra_r / B_intra, inter_r / B_inter)
//!                                    + m_intra_r * a_intra + m_inter_r * a_inter
//!                                    + local_r / B_local ],
//!                            max_n inter_n / B_node )
//! ```
//!
//! with `intra_r` / `inter_r` the larger of the bytes rank `r` sends and receives on that link
//! class, `m_*` the larger of its sent and received message counts, `local_r` the bytes it packs
//! and unpacks (everything it sends and receives, its own rows included) and `inter_n` the
//! larger of node `n`'s outgoing and incoming network bytes.

use super::EpGroup;
use crate::error::{ensure, Result};

/// Link parameters: bandwidths in bytes per second, latencies and overheads in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Links {
    /// Per rank and direction, inside a node (NVLink / HCCS; loopback in an emulation).
    pub intra_bw: f64,
    /// Per rank and direction, between nodes (its NIC).
    pub inter_bw: f64,
    /// Per node and direction, between nodes (all its NICs; `inf`: no shared limit).
    pub node_bw: f64,
    /// Per message.
    pub intra_latency: f64,
    pub inter_latency: f64,
    /// Local copies (packing and unpacking rows).
    pub local_bw: f64,
    /// Per stage (launches, synchronisation).
    pub stage_overhead: f64,
}

impl Default for Links {
    /// H800-class nodes, as the migration model's defaults: ~150 GB/s NVLink, ~45 GB/s a
    /// 400 Gb/s NIC per GPU, 20 us a message.
    fn default() -> Self {
        Links {
            intra_bw: 150e9,
            inter_bw: 45e9,
            node_bw: f64::INFINITY,
            intra_latency: 20e-6,
            inter_latency: 20e-6,
            local_bw: 1e12,
            stage_overhead: 0.0,
        }
    }
}

impl Links {
    pub fn check(&self) -> Result<()> {
        for (v, name) in [
            (self.intra_bw, "intra_node_bw"),
            (self.inter_bw, "inter_node_bw"),
            (self.local_bw, "local_bw"),
        ] {
            ensure(v.is_finite() && v > 0.0, name, || {
                format!("must be finite and > 0, got {v}")
            })?;
        }
        ensure(
            self.node_bw > 0.0 && !self.node_bw.is_nan(),
            "node_inter_bw",
            || {
                format!(
                    "must be > 0 (inf for no per-node limit), got {}",
                    self.node_bw
                )
            },
        )?;
        for (v, name) in [
            (self.intra_latency, "latency"),
            (self.inter_latency, "inter_node_latency"),
            (self.stage_overhead, "stage_overhead"),
        ] {
            ensure(v.is_finite() && v >= 0.0, name, || {
                format!("must be finite and >= 0, got {v}")
            })?;
        }
        Ok(())
    }
}

/// Per-rank and per-node row totals of one stage (independent of the row size), so a stage
/// is priced for any row size in `O(ranks + nodes)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StageLoad {
    /// Per rank: max(sent, received) rows inside the node / across nodes, the same for
    /// messages, and rows packed plus unpacked.
    intra: Vec<i64>,
    inter: Vec<i64>,
    intra_msgs: Vec<i64>,
    inter_msgs: Vec<i64>,
    local: Vec<i64>,
    /// Per node: max(out, in) network rows.
    node: Vec<i64>,
    any: bool,
}

impl StageLoad {
    pub fn new(rows: &[i64], topo: &EpGroup) -> Self {
        let (w_n, n_n, g_n) = (topo.ranks, topo.nodes(), topo.ranks_per_node);
        // Row sums (sent), column sums (received) and nonzero counts, split by link class:
        // straight passes over the matrix (vectorised), no per-element branches.
        let mut col = vec![0i64; w_n];
        let mut col_msgs = vec![0i64; w_n];
        let mut col_intra = vec![0i64; w_n];
        let mut col_intra_msgs = vec![0i64; w_n];
        let (mut intra, mut inter) = (vec![0i64; w_n], vec![0i64; w_n]);
        let (mut intra_msgs, mut inter_msgs) = (vec![0i64; w_n], vec![0i64; w_n]);
        let mut local = vec![0i64; w_n];
        let mut node = vec![[0i64; 2]; n_n];
        let mut any = false;
        for s in 0..w_n {
            let row = &rows[s * w_n..(s + 1) * w_n];
            let ns = topo.node(s);
            let own = &row[ns * g_n..(ns + 1) * g_n];
            let diag = row[s];
            let total: i64 = row.iter().sum();
            let nonzero: i64 = row.iter().map(|&v| (v != 0) as i64).sum();
            let own_sum: i64 = own.iter().sum();
            let own_nz: i64 = own.iter().map(|&v| (v != 0) as i64).sum();
            for (c, &v) in col.iter_mut().zip(row) {
                *c += v;
            }
            for (c, &v) in col_msgs.iter_mut().zip(row) {
                *c += (v != 0) as i64;
            }
            let ci = &mut col_intra[ns * g_n..(ns + 1) * g_n];
            for (c, &v) in ci.iter_mut().zip(own) {
                *c += v;
            }
            let cm = &mut col_intra_msgs[ns * g_n..(ns + 1) * g_n];
            for (c, &v) in cm.iter_mut().zip(own) {
                *c += (v != 0) as i64;
            }
            any |= nonzero > 0;
            // Sent: intra excludes the rank's rows to itself (a local copy).
            intra[s] = own_sum - diag;
            inter[s] = total - own_sum;
            intra_msgs[s] = own_nz - (diag != 0) as i64;
            inter_msgs[s] = nonzero - own_nz;
            local[s] += total;
            node[ns][0] += total - own_sum;
        }
        for d in 0..w_n {
            let diag = rows[d * w_n + d];
            let (in_intra, in_intra_msgs) =
                (col_intra[d] - diag, col_intra_msgs[d] - (diag != 0) as i64);
            let in_inter = col[d] - col_intra[d];
            let in_inter_msgs = col_msgs[d] - col_intra_msgs[d];
            intra[d] = intra[d].max(in_intra);
            inter[d] = inter[d].max(in_inter);
            intra_msgs[d] = intra_msgs[d].max(in_intra_msgs);
            inter_msgs[d] = inter_msgs[d].max(in_inter_msgs);
            local[d] += col[d];
            node[topo.node(d)][1] += in_inter;
        }
        StageLoad {
            intra,
            inter,
            intra_msgs,
            inter_msgs,
            local,
            node: node.iter().map(|a| a[0].max(a[1])).collect(),
            any,
        }
    }

    /// Estimated seconds with rows of `row_bytes`.
    pub fn seconds(&self, row_bytes: f64, links: &Links) -> f64 {
        if !self.any {
            return 0.0;
        }
        let mut worst = 0.0f64;
        for i in 0..self.intra.len() {
            let t = (self.intra[i] as f64 * row_bytes / links.intra_bw)
                .max(self.inter[i] as f64 * row_bytes / links.inter_bw)
                + self.intra_msgs[i] as f64 * links.intra_latency
                + self.inter_msgs[i] as f64 * links.inter_latency
                + self.local[i] as f64 * row_bytes / links.local_bw;
            worst = worst.max(t);
        }
        if links.node_bw.is_finite() {
            for &n in &self.node {
                worst = worst.max(n as f64 * row_bytes / links.node_bw);
            }
        }
        links.stage_overhead + worst
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stage_by_hand() {
        // 2 nodes x 2 ranks; rank 0 sends 10 rows to rank 1 (intra) and 4 to rank 2 (inter),
        // rank 3 sends 6 rows to rank 0 (inter) and 2 to itself.
        let topo = EpGroup::new(4, 2, 1).unwrap();
        let mut rows = vec![0i64; 16];
        rows[1] = 10;
        rows[2] = 4;
        rows[3 * 4] = 6;
        rows[3 * 4 + 3] = 2;
        let load = StageLoad::new(&rows, &topo);
        let links = Links {
            intra_bw: 100.0,
            inter_bw: 10.0,
            node_bw: 12.0,
            intra_latency: 1.0,
            inter_latency: 2.0,
            local_bw: 1000.0,
            stage_overhead: 0.5,
        };
        // Rank 0: intra 10 rows, inter max(4 out, 6 in) = 6 rows, 1 intra + 1 inter msgs, local
        // 10 + 4 + 6 = 20 rows. With 1-byte rows: max(0.1, 0.6) + 1 + 2 + 0.02 = 3.62.
        // Node 0 sends 4 and receives 6: 6 / 12 = 0.5. Rank 3: inter 6, 1 msg, local 6 + 2 + 2.
        let t = load.seconds(1.0, &links);
        assert!((t - (0.5 + 3.62)).abs() < 1e-12, "{t}");
        assert_eq!(StageLoad::new(&[0; 16], &topo).seconds(1.0, &links), 0.0);
        assert!(Links::default().check().is_ok());
        assert!(Links {
            inter_bw: 0.0,
            ..Links::default()
        }
        .check()
        .is_err());
    }
}
