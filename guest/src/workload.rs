//! The memory workload: stamps every page of a working set with
//! (page index, generation) and can verify every stamp afterwards, so a test
//! can prove guest memory came through a snapshot or a move intact.
//!
//! Pass 1 fills the whole set once (generation 1). After that a cursor sweeps
//! the set at the requested rate, each sweep a new generation: pages below
//! the cursor carry `generation`, the rest `generation - 1`.

use crate::start_info::{MemmapEntry, E820_RAM};

pub const PAGE: u64 = 4096;
const WORDS: usize = (PAGE / 8) as usize;
const MAGIC: u64 = 0x4645_5252_5900_0000; // "FERRY"
const MAX_RANGES: usize = 8;

#[derive(Clone, Copy, Default)]
struct Range {
    start: u64,
    pages: u64,
}

pub struct WorkingSet {
    ranges: [Range; MAX_RANGES],
    nranges: usize,
    pub pages: u64,
    pub generation: u64,
    pub cursor: u64,
}

pub struct Verdict {
    pub pages: u64,
    pub bad_pages: u64,
    pub first_bad: Option<(u64, u64)>,
    pub checksum: u64,
}

fn word(page: u64, generation: u64, k: usize) -> u64 {
    match k {
        0 => MAGIC ^ page,
        1 => generation,
        _ => {
            let mut x = page.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation.rotate_left(32) ^ k as u64;
            x ^= x >> 31;
            x.wrapping_mul(0xbf58_476d_1ce4_e5b9)
        }
    }
}

impl WorkingSet {
    /// Places `want_pages` pages in the RAM ranges of the memory map that lie
    /// at or above `floor`. Returns a smaller set if RAM runs out.
    pub fn new(memmap: &[MemmapEntry], floor: u64, want_pages: u64) -> WorkingSet {
        let mut ws =
            WorkingSet { ranges: [Range::default(); MAX_RANGES], nranges: 0, pages: 0, generation: 0, cursor: 0 };
        for e in memmap.iter().filter(|e| e.kind == E820_RAM) {
            if ws.pages >= want_pages || ws.nranges == MAX_RANGES {
                break;
            }
            let start = e.addr.max(floor).next_multiple_of(PAGE);
            let end = (e.addr + e.size) & !(PAGE - 1);
            if end <= start {
                continue;
            }
            let pages = ((end - start) / PAGE).min(want_pages - ws.pages);
            ws.ranges[ws.nranges] = Range { start, pages };
            ws.nranges += 1;
            ws.pages += pages;
        }
        ws
    }

    fn page_addr(&self, mut index: u64) -> u64 {
        for r in &self.ranges[..self.nranges] {
            if index < r.pages {
                return r.start + index * PAGE;
            }
            index -= r.pages;
        }
        unreachable_page()
    }

    fn stamp(&self, index: u64, generation: u64) {
        let p = self.page_addr(index) as *mut u64;
        for k in 0..WORDS {
            // SAFETY: the page lies in a RAM range of the memory map, which
            // is identity-mapped and owned by this guest alone.
            unsafe { p.add(k).write_volatile(word(index, generation, k)) };
        }
    }

    /// Pass 1: every page gets generation 1.
    pub fn fill(&mut self) {
        for i in 0..self.pages {
            self.stamp(i, 1);
        }
        self.generation = 2;
        self.cursor = 0;
    }

    /// Stamps up to `n` pages at the cursor; returns how many it did.
    pub fn dirty(&mut self, n: u64) -> u64 {
        if self.pages == 0 {
            return 0;
        }
        for _ in 0..n {
            self.stamp(self.cursor, self.generation);
            self.cursor += 1;
            if self.cursor == self.pages {
                self.cursor = 0;
                self.generation += 1;
            }
        }
        n
    }

    pub fn verify(&self) -> Verdict {
        let mut v = Verdict { pages: self.pages, bad_pages: 0, first_bad: None, checksum: 0xcbf2_9ce4_8422_2325 };
        for i in 0..self.pages {
            let generation = if i < self.cursor { self.generation } else { self.generation - 1 };
            let p = self.page_addr(i) as *const u64;
            let mut good = true;
            for k in 0..WORDS {
                // SAFETY: as in `stamp`.
                let w = unsafe { p.add(k).read_volatile() };
                v.checksum = (v.checksum ^ w).wrapping_mul(0x100_0000_01b3);
                good &= w == word(i, generation, k);
            }
            if !good {
                v.bad_pages += 1;
                if v.first_bad.is_none() {
                    v.first_bad = Some((i, self.page_addr(i)));
                }
            }
        }
        v
    }
}

fn unreachable_page() -> ! {
    crate::println!("workload: page index out of range");
    crate::ports::debug_exit(3)
}
