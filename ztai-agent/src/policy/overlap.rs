//! Exact overlap test for cgroup globs.
//!
//! Two selectors overlap when some cgroup path matches both. Sampling paths
//! would miss cases, so the globs' languages are intersected: each glob's
//! regex (from globset, so the semantics are the matcher's own) becomes a
//! dense DFA, and the product automaton — with a third automaton accepting
//! only well-formed relative cgroup paths — is searched breadth-first for a
//! state where every part accepts at end of input. BFS also yields the
//! shortest such path, which makes a useful example in the warning.

use std::cell::OnceCell;
use std::collections::{HashMap, VecDeque};

use globset::{Glob, GlobMatcher};
use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::nfa::thompson;
use regex_automata::util::primitives::StateID;
use regex_automata::util::start;
use regex_automata::util::syntax;
use regex_automata::{Anchored, MatchKind};

/// Bytes a DFA may use; bounds the work for pathological globs.
const DFA_SIZE_LIMIT: usize = 4 << 20;
/// Product states explored before giving up.
const MAX_PRODUCT_STATES: usize = 1 << 16;
/// Characters that make a glob more than a literal path (conservatively).
const GLOB_META: &[char] = &['*', '?', '[', ']', '{', '}', '\\'];

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub(crate) enum OverlapError {
    #[error("cannot build an automaton for `{glob}`: {reason}")]
    Build { glob: String, reason: String },
    #[error("the globs are too complex to compare")]
    TooComplex,
}

/// A glob prepared for language tests; the DFA is built only when a cheap
/// test cannot decide.
pub(crate) struct GlobLanguage {
    glob: Glob,
    matcher: GlobMatcher,
    /// Every matched path starts with this.
    prefix: String,
    /// The glob matches exactly this path and nothing else.
    literal: Option<String>,
    dfa: OnceCell<Result<dense::DFA<Vec<u32>>, OverlapError>>,
}

impl GlobLanguage {
    pub(crate) fn new(glob: Glob) -> Self {
        let pattern = glob.glob();
        let prefix_len = pattern.find(GLOB_META).unwrap_or(pattern.len());
        let prefix = pattern[..prefix_len].to_owned();
        let literal = (prefix_len == pattern.len()).then(|| prefix.clone());
        Self { matcher: glob.compile_matcher(), glob, prefix, literal, dfa: OnceCell::new() }
    }

    pub(crate) fn matcher(&self) -> &GlobMatcher {
        &self.matcher
    }

    fn dfa(&self) -> Result<&dense::DFA<Vec<u32>>, OverlapError> {
        self.dfa.get_or_init(|| build_dfa(&self.glob)).as_ref().map_err(Clone::clone)
    }

    /// The shortest cgroup path the glob matches (`None`: it matches none).
    pub(crate) fn example(&self) -> Result<Option<String>, OverlapError> {
        if let Some(lit) = &self.literal {
            return Ok(is_cgroup_path(lit.as_bytes()).then(|| lit.clone()));
        }
        Ok(shortest_common_path(&[self.dfa()?])?.map(display_path))
    }

    /// The shortest cgroup path both globs match (`None`: they are disjoint).
    pub(crate) fn common_example(&self, other: &Self) -> Result<Option<String>, OverlapError> {
        if !self.prefix.starts_with(&other.prefix) && !other.prefix.starts_with(&self.prefix) {
            return Ok(None);
        }
        match (&self.literal, &other.literal) {
            (Some(lit), _) if other.matcher.is_match(lit) => self.example(),
            (_, Some(lit)) if self.matcher.is_match(lit) => other.example(),
            (Some(_), _) | (_, Some(_)) => Ok(None),
            (None, None) => Ok(shortest_common_path(&[self.dfa()?, other.dfa()?])?.map(display_path)),
        }
    }
}

fn build_dfa(glob: &Glob) -> Result<dense::DFA<Vec<u32>>, OverlapError> {
    // Same syntax options globset uses for its own matcher, so the languages agree.
    let syntax = syntax::Config::new().utf8(false).dot_matches_new_line(true);
    let config = dense::Config::new()
        // All: no leftmost-first pruning, the DFA accepts the whole language.
        .match_kind(MatchKind::All)
        .start_kind(StartKind::Anchored)
        .dfa_size_limit(Some(DFA_SIZE_LIMIT))
        .determinize_size_limit(Some(DFA_SIZE_LIMIT));
    dense::Builder::new()
        .syntax(syntax)
        .thompson(thompson::Config::new().utf8(false))
        .configure(config)
        .build(glob.regex())
        .map_err(|e| OverlapError::Build { glob: glob.glob().to_owned(), reason: e.to_string() })
}

/// Where a path is in its well-formedness automaton: cgroup paths relative to
/// the mount are non-empty, have no leading, trailing or doubled '/', no NUL.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum PathState {
    Start,
    InName,
    AfterSlash,
}

fn path_step(state: PathState, byte: u8) -> Option<PathState> {
    match (state, byte) {
        (_, 0) => None,
        (PathState::InName, b'/') => Some(PathState::AfterSlash),
        (_, b'/') => None,
        _ => Some(PathState::InName),
    }
}

fn is_cgroup_path(path: &[u8]) -> bool {
    path.iter().try_fold(PathState::Start, |s, &b| path_step(s, b)).is_some_and(|s| s == PathState::InName)
}

/// Byte order for the BFS: readable characters first, so the shortest
/// example found is also a plausible cgroup name.
fn byte_order() -> Vec<u8> {
    let preferred: Vec<u8> = (b'a'..=b'z').chain(b'0'..=b'9').chain(*b"-._/").collect();
    let rest = (1..=u8::MAX).filter(|b| !preferred.contains(b));
    preferred.iter().copied().chain(rest).collect()
}

/// One byte per class of bytes that no DFA and no path rule tells apart
/// (in `byte_order`'s preference, so reported paths stay readable): the
/// search then steps over tens of bytes instead of 255.
fn representative_bytes(dfas: &[&dense::DFA<Vec<u32>>]) -> Vec<u8> {
    let mut seen = std::collections::HashSet::new();
    byte_order()
        .into_iter()
        .filter(|&b| {
            let classes: Vec<u8> = dfas.iter().map(|d| d.byte_classes().get(b)).collect();
            let path = [PathState::Start, PathState::InName, PathState::AfterSlash].map(|s| path_step(s, b));
            seen.insert((classes, path))
        })
        .collect()
}

type ProductState = (Vec<StateID>, PathState);

/// Shortest well-formed cgroup path every DFA accepts (anchored, whole input).
fn shortest_common_path(dfas: &[&dense::DFA<Vec<u32>>]) -> Result<Option<Vec<u8>>, OverlapError> {
    let anchored = start::Config::new().anchored(Anchored::Yes);
    let mut start = Vec::with_capacity(dfas.len());
    for dfa in dfas {
        start.push(dfa.start_state(&anchored).map_err(|_| OverlapError::TooComplex)?);
    }
    let start: ProductState = (start, PathState::Start);

    // Parent links rebuild the path once an accepting state is reached.
    let mut parent: HashMap<ProductState, Option<(ProductState, u8)>> = HashMap::new();
    parent.insert(start.clone(), None);
    let mut queue = VecDeque::from([start]);
    let bytes = representative_bytes(dfas);

    while let Some(state) = queue.pop_front() {
        let accepts = state.1 == PathState::InName
            && dfas.iter().zip(&state.0).all(|(d, &s)| d.is_match_state(d.next_eoi_state(s)));
        if accepts {
            return Ok(Some(rebuild_path(&parent, state)));
        }
        'bytes: for &byte in &bytes {
            let Some(path_state) = path_step(state.1, byte) else { continue };
            let mut next = Vec::with_capacity(dfas.len());
            for (dfa, &s) in dfas.iter().zip(&state.0) {
                let n = dfa.next_state(s, byte);
                if dfa.is_dead_state(n) {
                    continue 'bytes;
                }
                if dfa.is_quit_state(n) {
                    return Err(OverlapError::TooComplex);
                }
                next.push(n);
            }
            let next = (next, path_state);
            if parent.contains_key(&next) {
                continue;
            }
            if parent.len() >= MAX_PRODUCT_STATES {
                return Err(OverlapError::TooComplex);
            }
            parent.insert(next.clone(), Some((state.clone(), byte)));
            queue.push_back(next);
        }
    }
    Ok(None)
}

fn rebuild_path(parent: &HashMap<ProductState, Option<(ProductState, u8)>>, mut state: ProductState) -> Vec<u8> {
    let mut path = Vec::new();
    while let Some(Some((prev, byte))) = parent.get(&state) {
        path.push(*byte);
        state = prev.clone();
    }
    path.reverse();
    path
}

fn display_path(path: Vec<u8>) -> String {
    match String::from_utf8(path) {
        Ok(s) => s,
        Err(e) => e.as_bytes().escape_ascii().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use globset::GlobBuilder;

    fn lang(pattern: &str) -> GlobLanguage {
        let glob = GlobBuilder::new(pattern).literal_separator(true).build().expect("test glob is valid");
        GlobLanguage::new(glob)
    }

    fn common(a: &str, b: &str) -> Option<String> {
        let forward = lang(a).common_example(&lang(b)).expect("decidable");
        let backward = lang(b).common_example(&lang(a)).expect("decidable");
        assert_eq!(forward.is_some(), backward.is_some(), "overlap must be symmetric: {a} vs {b}");
        if let Some(path) = &forward {
            assert!(lang(a).matcher.is_match(path) && lang(b).matcher.is_match(path), "{path} matches both");
        }
        forward
    }

    #[test]
    fn required_cases() {
        assert_eq!(common("a/*", "a/b").as_deref(), Some("a/b"));
        assert_eq!(common("a/x*", "a/y*"), None);
        assert_eq!(common("a/**", "a/b/c").as_deref(), Some("a/b/c"));
        assert_eq!(common("*", "a/b"), None);
    }

    #[test]
    fn non_literal_pairs_use_the_product_automaton() {
        assert_eq!(common("a/*", "*/b").as_deref(), Some("a/b"));
        assert_eq!(common("a/x*", "a/*y").as_deref(), Some("a/xy"));
        assert_eq!(common("ai.slice/inference*", "ai.slice/*").as_deref(), Some("ai.slice/inference"));
        assert_eq!(common("**/web*", "ai.slice/*").as_deref(), Some("ai.slice/web"));
        assert_eq!(common("a/[xy]*", "a/[yz]?").as_deref(), Some("a/ya"));
        assert_eq!(common("a/[x]*", "a/[yz]?"), None);
        assert_eq!(common("a/{b,c}/*", "a/*/d").as_deref(), Some("a/b/d"));
        assert_eq!(common("a/*/*", "a/**").as_deref(), Some("a/a/a"));
        assert_eq!(common("a/*/*", "a/*"), None);
    }

    #[test]
    fn malformed_paths_do_not_count_as_overlap() {
        // "a/" matches both `a/*` and `a/**` but is not a cgroup path.
        assert_eq!(common("a/*", "a/"), None);
        assert_eq!(common("a*", "*b*").as_deref(), Some("ab"));
        assert_eq!(lang("a/").example(), Ok(None));
        assert_eq!(lang("a//*").example(), Ok(None));
        assert_eq!(lang("*").example(), Ok(Some("a".to_owned())));
    }

    /// The automaton answer equals brute force over every short path.
    #[test]
    fn agrees_with_enumeration() {
        let globs = [
            "a", "b", "a/b", "*", "a*", "*a", "a/*", "*/a", "**", "a/**", "**/a", "**/b/*", "a/**/b", "?", "??",
            "[ab]/a", "{a,b}*", "*/*", "a?b", "[!a]*", "b/**/*",
        ];
        let alphabet = [b'a', b'b', b'/'];
        let mut paths: Vec<String> = vec![String::new()];
        let mut frontier = paths.clone();
        for _ in 0..5 {
            let mut next = Vec::new();
            for p in &frontier {
                for &c in &alphabet {
                    next.push(format!("{p}{}", c as char));
                }
            }
            paths.extend(next.iter().cloned());
            frontier = next;
        }
        let paths: Vec<String> = paths.into_iter().filter(|p| is_cgroup_path(p.as_bytes())).collect();
        for a in globs {
            for b in globs {
                let (la, lb) = (lang(a), lang(b));
                let brute = paths.iter().any(|p| la.matcher.is_match(p) && lb.matcher.is_match(p));
                let found = common(a, b);
                // Enumeration is bounded, so it can only miss overlaps that need long paths.
                if brute {
                    assert!(found.is_some(), "{a} vs {b} overlap");
                } else if let Some(path) = found {
                    assert!(path.len() > 5, "{a} vs {b}: short witness {path} missed by enumeration");
                }
            }
        }
    }

    #[test]
    fn path_well_formedness() {
        for good in ["a", "a/b", "ai.slice/x.scope", "a b"] {
            assert!(is_cgroup_path(good.as_bytes()), "{good}");
        }
        for bad in ["", "/", "/a", "a/", "a//b", "a\0b"] {
            assert!(!is_cgroup_path(bad.as_bytes()), "{bad:?}");
        }
    }
}
