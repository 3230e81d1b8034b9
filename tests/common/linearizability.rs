//! A Wing–Gong linearizability checker with Lowe's memoization, for a single register
//! (one key of the cluster variables). Keys are independent, so a history is checked key by
//! key (P-compositionality).

use std::collections::HashSet;

/// One operation on the register as a client saw it.
#[derive(Clone, Debug)]
pub struct Op {
    pub call: u64,
    /// `None`: the outcome is unknown (it may take effect at any time after `call`, or never).
    pub ret: Option<u64>,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    /// What the read returned (`None`: absent).
    Read(Option<String>),
}

/// Returns Ok if the history is linearizable, or Err with a description.
pub fn check(ops: &[Op]) -> Result<(), String> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut remaining = vec![0u64; words];
    for i in 0..n {
        remaining[i / 64] |= 1 << (i % 64);
    }
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    if search(ops, &mut remaining, &mut seen) {
        Ok(())
    } else {
        Err(format!(
            "no linearization exists for {n} operations (explored {} states)",
            seen.len()
        ))
    }
}

enum Step {
    /// Only operations with unknown outcome remain: they may never have happened.
    Done,
    /// This (remaining set, register value) was explored before and failed.
    Seen,
    /// Operations that may be linearized next, each with the register value after it.
    Candidates(Vec<(usize, Option<String>)>),
}

fn expand(
    ops: &[Op],
    remaining: &[u64],
    state: &Option<String>,
    seen: &mut HashSet<(Vec<u64>, Option<String>)>,
) -> Step {
    let live: Vec<usize> = (0..ops.len())
        .filter(|i| remaining[i / 64] & (1 << (i % 64)) != 0)
        .collect();
    if live.iter().all(|&i| ops[i].ret.is_none()) {
        return Step::Done;
    }
    if !seen.insert((remaining.to_vec(), state.clone())) {
        return Step::Seen;
    }
    // The next linearized op must have been called before every remaining op returned.
    let min_ret = live
        .iter()
        .filter_map(|&i| ops[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    let mut out = Vec::new();
    for &i in &live {
        let op = &ops[i];
        if op.call > min_ret {
            continue;
        }
        match &op.kind {
            Kind::Write(v) => out.push((i, Some(v.clone()))),
            Kind::Read(r) if r == state => out.push((i, state.clone())),
            Kind::Read(_) => {}
        }
    }
    Step::Candidates(out)
}

/// Depth-first search with an explicit stack: histories have thousands of operations per
/// key, far deeper than a test thread's stack would allow recursion to go.
fn search(
    ops: &[Op],
    remaining: &mut [u64],
    seen: &mut HashSet<(Vec<u64>, Option<String>)>,
) -> bool {
    let mut stack = match expand(ops, remaining, &None, seen) {
        Step::Done => return true,
        Step::Seen => return false,
        Step::Candidates(c) => vec![(c, 0usize)],
    };
    // The operation taken to reach each frame after the first.
    let mut path: Vec<usize> = Vec::new();
    while let Some((cands, cursor)) = stack.last_mut() {
        let Some((i, next)) = cands.get(*cursor).cloned() else {
            stack.pop();
            if let Some(i) = path.pop() {
                remaining[i / 64] |= 1 << (i % 64);
            }
            continue;
        };
        *cursor += 1;
        remaining[i / 64] &= !(1 << (i % 64));
        match expand(ops, remaining, &next, seen) {
            Step::Done => return true,
            Step::Seen => remaining[i / 64] |= 1 << (i % 64),
            Step::Candidates(c) => {
                path.push(i);
                stack.push((c, 0));
            }
        }
    }
    false
}
