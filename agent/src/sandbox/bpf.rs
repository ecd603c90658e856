//! Compiles a seccomp policy (an answer per system call number, some of
//! them depending on an argument) into one classic BPF program. The
//! numbers are sorted and merged into ranges that share an answer, and a
//! call finds its range by a binary search of `JGE` jumps: a handful of
//! instructions run per call, the program stays short (so installing it,
//! which the kernel does for every job, is cheap), and every call that is
//! always allowed is allowed by constant tests of the number alone, which
//! lets the kernel see that from the program and skip the filter for it.
//!
//! It knows nothing of which calls are denied (`syscalls.rs` says). It must
//! never emit a jump backwards or past the end, nor a program that can run
//! off its end: [`compile`] refuses rather than emit one.

use std::collections::BTreeMap;

/// A compiled filter, ready for `seccomp(SECCOMP_SET_MODE_FILTER)`.
pub type Program = Vec<libc::sock_filter>;

/// What the filter answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Ret {
    Allow,
    /// The call fails with this errno.
    Errno(u16),
    KillProcess,
}

impl Ret {
    pub fn value(self) -> u32 {
        match self {
            Ret::Allow => libc::SECCOMP_RET_ALLOW,
            Ret::Errno(errno) => libc::SECCOMP_RET_ERRNO | u32::from(errno),
            Ret::KillProcess => libc::SECCOMP_RET_KILL_PROCESS,
        }
    }
}

/// A test of the low 32 bits of one argument: all the calls checked here
/// take an `int` or `unsigned int` there (the kernel ignores the rest),
/// and the flags tested of `clone`'s all sit in the low half.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgTest {
    /// Any of these bits is set.
    AnyBitOf(u32),
    Equals(u32),
    /// None of these values.
    NoneOf(Vec<u32>),
}

/// One argument test and the answer when it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArgRule {
    /// Which argument, 0 to 5.
    pub arg: u8,
    pub test: ArgTest,
    pub then: Ret,
}

/// The answer for one system call number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    Always(Ret),
    /// The first rule that holds answers; `otherwise` when none does.
    Args {
        rules: Vec<ArgRule>,
        otherwise: Ret,
    },
}

/// A whole filter's policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// The only `AUDIT_ARCH_*` accepted; any other is answered `wrong_arch`.
    pub audit_arch: u32,
    pub wrong_arch: Ret,
    /// Numbers from this one up (x32's on x86_64) get this answer, before
    /// any rule.
    pub numbers_from: Option<(u32, Ret)>,
    pub rules: BTreeMap<u32, Rule>,
    /// The answer for a number without a rule.
    pub default: Ret,
}

/// The kernel's limit on a program's length (`BPF_MAXINSNS`).
const MAX_INSNS: usize = 4096;

// Offsets into `struct seccomp_data` (linux/seccomp.h).
const NR: u32 = 0;
const ARCH: u32 = 4;
const ARGS: u32 = 16;

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JA: u16 = (libc::BPF_JMP | libc::BPF_JA) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

/// The offset of the low 32 bits of argument `arg` (both architectures the
/// agent runs on are little endian).
#[cfg(target_endian = "little")]
fn low_half_of_arg(arg: u8) -> u32 {
    ARGS + 8 * u32::from(arg)
}

/// Compiles `policy`; an error names what cannot be expressed (a program
/// too long, a jump too far, an argument that does not exist).
pub fn compile(policy: &Policy) -> Result<Program, String> {
    let mut asm = Assembler::default();
    let wrong_arch = asm.ret(policy.wrong_arch);
    asm.stmt(LD_W_ABS, ARCH);
    asm.jump(
        JEQ_K,
        policy.audit_arch,
        Target::Next,
        Target::To(wrong_arch),
    );
    asm.stmt(LD_W_ABS, NR);
    if let Some((from, ret)) = policy.numbers_from {
        let refused = asm.ret(ret);
        asm.jump(JGE_K, from, Target::To(refused), Target::Next);
    }
    let ranges = ranges(policy, &mut asm)?;
    if let [(_, only)] = ranges.as_slice() {
        asm.jump(JA, 0, Target::To(*only), Target::To(*only));
    } else {
        asm.search(&ranges);
    }
    asm.emit_blocks();
    asm.finish()
}

/// Every number from 0 to `u32::MAX` in ranges of one answer each, in
/// order: the first number of each range and where its answer is.
fn ranges(policy: &Policy, asm: &mut Assembler) -> Result<Vec<(u32, Label)>, String> {
    let mut answers: Vec<(Rule, Label)> = Vec::new();
    let default_rule = Rule::Always(policy.default);
    let mut label_of = |rule: &Rule, asm: &mut Assembler| -> Result<Label, String> {
        if let Some((_, label)) = answers.iter().find(|(r, _)| r == rule) {
            return Ok(*label);
        }
        let label = match rule {
            Rule::Always(ret) => asm.ret(*ret),
            Rule::Args { rules, otherwise } => asm.args_block(rules, *otherwise)?,
        };
        answers.push((rule.clone(), label));
        Ok(label)
    };
    let default = label_of(&default_rule, asm)?;
    let mut ranges: Vec<(u32, Label)> = Vec::new();
    let mut add = |start: u32, label: Label| {
        // A range with the answer of the one before it only extends it.
        if ranges.last().map(|(_, last)| *last) != Some(label) {
            ranges.push((start, label));
        }
    };
    let mut next = 0u64;
    for (&nr, rule) in &policy.rules {
        let label = label_of(rule, asm)?;
        if u64::from(nr) > next {
            add(next as u32, default);
        }
        add(nr, label);
        next = u64::from(nr) + 1;
    }
    if next <= u64::from(u32::MAX) {
        add(next as u32, default);
    }
    Ok(ranges)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Label(usize);

#[derive(Debug, Clone, Copy)]
enum Target {
    Next,
    To(Label),
}

#[derive(Debug, Clone, Copy)]
enum Insn {
    Stmt {
        code: u16,
        k: u32,
    },
    Jump {
        code: u16,
        k: u32,
        jt: Target,
        jf: Target,
    },
}

/// An argument check waiting to be placed.
struct ArgsBlock {
    label: Label,
    rules: Vec<ArgRule>,
    otherwise: Ret,
}

/// Instructions in order, jumps to labels resolved at the end. The
/// argument checks and the returns are placed after the search, so every
/// jump goes forwards.
#[derive(Default)]
struct Assembler {
    insns: Vec<Insn>,
    /// Where each label points, once placed.
    labels: Vec<Option<usize>>,
    blocks: Vec<ArgsBlock>,
    /// One `RET` per distinct answer.
    rets: BTreeMap<Ret, Label>,
}

impl Assembler {
    fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    fn place(&mut self, label: Label) {
        self.labels[label.0] = Some(self.insns.len());
    }

    fn stmt(&mut self, code: u16, k: u32) {
        self.insns.push(Insn::Stmt { code, k });
    }

    fn jump(&mut self, code: u16, k: u32, jt: Target, jf: Target) {
        self.insns.push(Insn::Jump { code, k, jt, jf });
    }

    /// The label of the `RET` of `ret` (placed once, at the end).
    fn ret(&mut self, ret: Ret) -> Label {
        if let Some(label) = self.rets.get(&ret) {
            return *label;
        }
        let label = self.label();
        self.rets.insert(ret, label);
        label
    }

    /// The label of a check of `rules`, placed later by `emit_blocks`.
    fn args_block(&mut self, rules: &[ArgRule], otherwise: Ret) -> Result<Label, String> {
        if let Some(rule) = rules.iter().find(|r| r.arg > 5) {
            return Err(format!(
                "a rule tests argument {}, past the sixth",
                rule.arg
            ));
        }
        let label = self.label();
        self.blocks.push(ArgsBlock {
            label,
            rules: rules.to_vec(),
            otherwise,
        });
        Ok(label)
    }

    /// The binary search over `ranges` (sorted by first number, the first
    /// from 0): each jump splits them in two at the middle one. Returns
    /// where the search (or the only range's answer) starts.
    fn search(&mut self, ranges: &[(u32, Label)]) -> Label {
        if let [(_, only)] = ranges {
            return *only;
        }
        let mid = ranges.len() / 2;
        let here = self.label();
        self.place(here);
        let at = self.insns.len();
        self.jump(JGE_K, ranges[mid].0, Target::Next, Target::Next);
        let below = self.search(&ranges[..mid]);
        let from = self.search(&ranges[mid..]);
        if let Insn::Jump { jt, jf, .. } = &mut self.insns[at] {
            *jt = Target::To(from);
            *jf = Target::To(below);
        }
        here
    }

    /// Places the argument checks, then the returns.
    fn emit_blocks(&mut self) {
        for block in std::mem::take(&mut self.blocks) {
            self.place(block.label);
            for rule in &block.rules {
                let then = Target::To(self.ret(rule.then));
                self.stmt(LD_W_ABS, low_half_of_arg(rule.arg));
                match &rule.test {
                    ArgTest::AnyBitOf(mask) => self.jump(JSET_K, *mask, then, Target::Next),
                    ArgTest::Equals(value) => self.jump(JEQ_K, *value, then, Target::Next),
                    ArgTest::NoneOf(values) => {
                        // A value met skips to the next rule; past them all,
                        // the test holds.
                        let next_rule = self.label();
                        for value in values {
                            self.jump(JEQ_K, *value, Target::To(next_rule), Target::Next);
                        }
                        self.jump(JA, 0, then, then);
                        self.place(next_rule);
                    }
                }
            }
            let otherwise = Target::To(self.ret(block.otherwise));
            self.jump(JA, 0, otherwise, otherwise);
        }
        for (ret, label) in std::mem::take(&mut self.rets) {
            self.place(label);
            self.stmt(RET_K, ret.value());
        }
    }

    fn finish(self) -> Result<Program, String> {
        if self.insns.len() > MAX_INSNS {
            return Err(format!(
                "{} instructions, more than the kernel's {MAX_INSNS}",
                self.insns.len()
            ));
        }
        let offset = |from: usize, to: Target| -> Result<u32, String> {
            let to = match to {
                Target::Next => from + 1,
                Target::To(label) => {
                    self.labels.get(label.0).copied().flatten().ok_or_else(|| {
                        format!("instruction {from} jumps to a label never placed")
                    })?
                }
            };
            if to <= from || to >= self.insns.len() {
                return Err(format!(
                    "instruction {from} jumps to {to}, not forwards inside the program"
                ));
            }
            Ok((to - from - 1) as u32)
        };
        if !matches!(self.insns.last(), Some(Insn::Stmt { code: RET_K, .. })) {
            return Err("the program does not end in a return".to_string());
        }
        let mut program = Program::with_capacity(self.insns.len());
        for (i, insn) in self.insns.iter().enumerate() {
            let (code, k, jt, jf) = match *insn {
                Insn::Stmt { code, k } => (code, k, 0, 0),
                Insn::Jump { code: JA, jt, .. } => (JA, offset(i, jt)?, 0, 0),
                Insn::Jump { code, k, jt, jf } => {
                    let short = |to| {
                        let o = offset(i, to)?;
                        u8::try_from(o)
                            .map_err(|_| format!("instruction {i} jumps {o} on, past 255"))
                    };
                    (code, k, short(jt)?, short(jf)?)
                }
            };
            program.push(libc::sock_filter { code, jt, jf, k });
        }
        Ok(program)
    }
}

/// Tests: a classic BPF interpreter for seccomp programs (the instructions
/// this module and `seccompiler` emit; any other is a test failure), the
/// kernel's way of combining several filters, its check of which calls a
/// program always allows, and a check of a program's shape.
#[cfg(test)]
pub(crate) mod interpret {
    use super::{JA, JEQ_K, JGE_K, JSET_K, LD_W_ABS, MAX_INSNS, RET_K};

    const JGT_K: u16 = (libc::BPF_JMP | libc::BPF_JGT | libc::BPF_K) as u16;
    const AND_K: u16 = (libc::BPF_ALU | libc::BPF_AND | libc::BPF_K) as u16;

    /// `struct seccomp_data`.
    #[derive(Debug, Clone, Copy, Default)]
    pub struct Data {
        pub nr: u32,
        pub arch: u32,
        pub instruction_pointer: u64,
        pub args: [u64; 6],
    }

    impl Data {
        fn word(&self, offset: u32) -> u32 {
            assert_eq!(offset % 4, 0, "a misaligned load at {offset}");
            let half = |v: u64, high: bool| if high { (v >> 32) as u32 } else { v as u32 };
            match offset {
                0 => self.nr,
                4 => self.arch,
                8 | 12 => half(self.instruction_pointer, offset == 12),
                16..=60 => {
                    let i = (offset - 16) as usize;
                    half(self.args[i / 8], i % 8 == 4)
                }
                _ => panic!("a load past seccomp_data at {offset}"),
            }
        }
    }

    /// What `program` answers for `data`.
    pub fn run(program: &[libc::sock_filter], data: &Data) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = program.get(pc).expect("the program ran off its end");
            let jump = |taken: bool| pc + 1 + usize::from(if taken { insn.jt } else { insn.jf });
            pc = match insn.code {
                LD_W_ABS => {
                    acc = data.word(insn.k);
                    pc + 1
                }
                AND_K => {
                    acc &= insn.k;
                    pc + 1
                }
                JA => pc + 1 + insn.k as usize,
                JEQ_K => jump(acc == insn.k),
                JGE_K => jump(acc >= insn.k),
                JGT_K => jump(acc > insn.k),
                JSET_K => jump(acc & insn.k != 0),
                RET_K => return insn.k,
                code => panic!("instruction {pc}: opcode {code:#x} not interpreted"),
            };
        }
    }

    /// What the kernel answers with `filters` installed in this order: the
    /// most restrictive action of all, and of equal ones the last
    /// installed's (`seccomp_run_filters`).
    pub fn run_all(filters: &[&[libc::sock_filter]], data: &Data) -> u32 {
        let action = |ret: u32| (ret & libc::SECCOMP_RET_ACTION_FULL) as i32;
        let mut answer = libc::SECCOMP_RET_ALLOW;
        for filter in filters.iter().rev() {
            let ret = run(filter, data);
            if action(ret) < action(answer) {
                answer = ret;
            }
        }
        answer
    }

    /// Whether the kernel sees from the program alone that it allows call
    /// `nr` of `arch` whatever its arguments, and so never runs it for
    /// that call (`seccomp_is_const_allow`).
    pub fn always_allows(program: &[libc::sock_filter], arch: u32, nr: u32) -> bool {
        let mut acc = 0u32;
        let mut pc = 0usize;
        while let Some(insn) = program.get(pc) {
            let jump = |taken: bool| pc + 1 + usize::from(if taken { insn.jt } else { insn.jf });
            pc = match insn.code {
                LD_W_ABS if insn.k == 0 => {
                    acc = nr;
                    pc + 1
                }
                LD_W_ABS if insn.k == 4 => {
                    acc = arch;
                    pc + 1
                }
                RET_K => return insn.k == libc::SECCOMP_RET_ALLOW,
                JA => pc + 1 + insn.k as usize,
                JEQ_K => jump(acc == insn.k),
                JGE_K => jump(acc >= insn.k),
                JGT_K => jump(acc > insn.k),
                JSET_K => jump(acc & insn.k != 0),
                AND_K => {
                    acc &= insn.k;
                    pc + 1
                }
                _ => return false,
            };
        }
        false
    }

    /// A program the kernel accepts and that cannot run off its end: no
    /// longer than the limit, every jump inside, the last instruction a
    /// return.
    pub fn check(program: &[libc::sock_filter]) -> Result<(), String> {
        if program.is_empty() || program.len() > MAX_INSNS {
            return Err(format!("{} instructions", program.len()));
        }
        for (pc, insn) in program.iter().enumerate() {
            let targets = match insn.code {
                JA => vec![pc + 1 + insn.k as usize],
                RET_K => vec![],
                code if code & 0x07 == libc::BPF_JMP as u16 => {
                    vec![pc + 1 + usize::from(insn.jt), pc + 1 + usize::from(insn.jf)]
                }
                _ => vec![pc + 1],
            };
            if let Some(to) = targets.iter().find(|&&to| to >= program.len()) {
                return Err(format!("instruction {pc} goes to {to}, past the end"));
            }
        }
        match program.last() {
            Some(last) if last.code == RET_K => Ok(()),
            _ => Err("the last instruction is not a return".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::interpret::{check, run, Data};
    use super::*;

    const ARCH_A: u32 = 0xC000_003E;

    fn policy(rules: BTreeMap<u32, Rule>) -> Policy {
        Policy {
            audit_arch: ARCH_A,
            wrong_arch: Ret::KillProcess,
            numbers_from: None,
            rules,
            default: Ret::Allow,
        }
    }

    fn answer(program: &[libc::sock_filter], nr: u32, args: [u64; 6]) -> u32 {
        run(
            program,
            &Data {
                nr,
                arch: ARCH_A,
                args,
                ..Data::default()
            },
        )
    }

    #[test]
    fn an_empty_policy_allows_every_number_and_kills_another_arch() {
        let program = compile(&policy(BTreeMap::new())).expect("compiles");
        check(&program).expect("well formed");
        for nr in [0, 1, 500, u32::MAX] {
            assert_eq!(answer(&program, nr, [0; 6]), libc::SECCOMP_RET_ALLOW);
        }
        let other = Data {
            arch: 0x4000_0003,
            ..Data::default()
        };
        assert_eq!(run(&program, &other), libc::SECCOMP_RET_KILL_PROCESS);
    }

    #[test]
    fn numbers_at_either_end_and_runs_of_neighbours_get_their_own_answer() {
        let eperm = Rule::Always(Ret::Errno(1));
        let mut rules = BTreeMap::new();
        for nr in [0, 1, 2, 7, 9, 10, 11, 300, u32::MAX] {
            rules.insert(nr, eperm.clone());
        }
        rules.insert(8, Rule::Always(Ret::Errno(38)));
        let program = compile(&policy(rules.clone())).expect("compiles");
        check(&program).expect("well formed");
        for nr in (0..=400).chain([u32::MAX - 1, u32::MAX]) {
            let expected = match rules.get(&nr) {
                Some(Rule::Always(ret)) => ret.value(),
                _ => libc::SECCOMP_RET_ALLOW,
            };
            assert_eq!(answer(&program, nr, [0; 6]), expected, "number {nr}");
        }
    }

    #[test]
    fn argument_rules_answer_by_the_first_that_holds() {
        let mut rules = BTreeMap::new();
        rules.insert(
            5,
            Rule::Args {
                rules: vec![
                    ArgRule {
                        arg: 0,
                        test: ArgTest::NoneOf(vec![1, 2]),
                        then: Ret::Errno(1),
                    },
                    ArgRule {
                        arg: 2,
                        test: ArgTest::Equals(132),
                        then: Ret::Errno(13),
                    },
                    ArgRule {
                        arg: 5,
                        test: ArgTest::AnyBitOf(0x30),
                        then: Ret::KillProcess,
                    },
                ],
                otherwise: Ret::Allow,
            },
        );
        let program = compile(&policy(rules)).expect("compiles");
        check(&program).expect("well formed");
        let eperm = Ret::Errno(1).value();
        assert_eq!(answer(&program, 5, [3, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(answer(&program, 5, [1 << 32 | 3, 0, 0, 0, 0, 0]), eperm);
        assert_eq!(
            answer(&program, 5, [1, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            answer(&program, 5, [2, 0, 132, 0, 0, 0]),
            Ret::Errno(13).value()
        );
        assert_eq!(
            answer(&program, 5, [2, 0, 0, 0, 0, 0x10]),
            libc::SECCOMP_RET_KILL_PROCESS
        );
        assert_eq!(
            answer(&program, 5, [2, 0, 0, 0, 0, 0x40]),
            libc::SECCOMP_RET_ALLOW
        );
        assert_eq!(
            answer(&program, 4, [3, 0, 0, 0, 0, 0]),
            libc::SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn a_seventh_argument_is_refused() {
        let mut rules = BTreeMap::new();
        rules.insert(
            1,
            Rule::Args {
                rules: vec![ArgRule {
                    arg: 6,
                    test: ArgTest::Equals(0),
                    then: Ret::Errno(1),
                }],
                otherwise: Ret::Allow,
            },
        );
        assert!(compile(&policy(rules)).is_err());
    }

    #[test]
    fn a_policy_too_big_for_short_jumps_is_refused_not_miscompiled() {
        let mut rules = BTreeMap::new();
        for nr in (0..2000).step_by(2) {
            rules.insert(nr, Rule::Always(Ret::Errno(1)));
        }
        let why = compile(&policy(rules)).expect_err("a jump of more than 255");
        assert!(why.contains("past 255"), "{why}");
    }
}
