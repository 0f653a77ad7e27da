//! The vocabulary of the data set: palette colors, shape kinds, size classes, grid cells,
//! relations, and the held-out color-kind combinations.

/// A palette color. Shapes and backgrounds use only these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Color {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
    White,
    Black,
}

impl Color {
    pub const ALL: [Color; 8] = [
        Color::Red,
        Color::Green,
        Color::Blue,
        Color::Yellow,
        Color::Purple,
        Color::Orange,
        Color::White,
        Color::Black,
    ];

    pub fn rgb(self) -> [u8; 3] {
        match self {
            Color::Red => [220, 40, 40],
            Color::Green => [40, 170, 60],
            Color::Blue => [40, 80, 220],
            Color::Yellow => [240, 210, 40],
            Color::Purple => [150, 60, 200],
            Color::Orange => [245, 140, 30],
            Color::White => [245, 245, 245],
            Color::Black => [20, 20, 20],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Color::Red => "red",
            Color::Green => "green",
            Color::Blue => "blue",
            Color::Yellow => "yellow",
            Color::Purple => "purple",
            Color::Orange => "orange",
            Color::White => "white",
            Color::Black => "black",
        }
    }

    pub fn from_name(name: &str) -> Option<Color> {
        Color::ALL.into_iter().find(|c| c.name() == name)
    }

    /// The palette color nearest (Euclidean RGB) to `rgb`; ties go to the earlier color.
    pub fn nearest(rgb: [f64; 3]) -> Color {
        let dist = |c: Color| {
            let p = c.rgb();
            (0..3)
                .map(|k| (rgb[k] - f64::from(p[k])).powi(2))
                .sum::<f64>()
        };
        let mut best = Color::ALL[0];
        for c in Color::ALL {
            if dist(c) < dist(best) {
                best = c;
            }
        }
        best
    }
}

/// A shape kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Circle,
    /// Axis-aligned.
    Square,
    /// Equilateral, apex up.
    Triangle,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Circle, Kind::Square, Kind::Triangle];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Circle => "circle",
            Kind::Square => "square",
            Kind::Triangle => "triangle",
        }
    }

    pub fn from_name(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == name)
    }
}

/// A size class, defined by the shape's width in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub const ALL: [Size; 2] = [Size::Small, Size::Large];

    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    pub fn from_name(name: &str) -> Option<Size> {
        Size::ALL.into_iter().find(|s| s.name() == name)
    }

    /// The widths the generator draws for this class (inclusive).
    pub fn widths(self) -> (u32, u32) {
        match self {
            Size::Small => (12, 18),
            Size::Large => (26, 34),
        }
    }
}

/// A cell of the 3 x 3 grid over the canvas; row 0 is the top, column 0 the left.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cell {
    pub row: u8,
    pub col: u8,
}

impl Cell {
    /// All nine cells, row by row.
    pub const ALL: [Cell; 9] = {
        let mut cells = [Cell { row: 0, col: 0 }; 9];
        let mut i = 0;
        while i < 9 {
            cells[i] = Cell {
                row: (i / 3) as u8,
                col: (i % 3) as u8,
            };
            i += 1;
        }
        cells
    };

    /// The cell holding a centre given in doubled coordinates (`xmin + xmax + 1`, likewise y)
    /// on a `width` x `height` canvas: column = floor(centre_x * 3 / width), row likewise.
    pub fn of_centre2(cx2: u32, cy2: u32, width: u32, height: u32) -> Cell {
        let axis = |c2: u32, len: u32| ((u64::from(c2) * 3) / (2 * u64::from(len))).min(2) as u8;
        Cell {
            row: axis(cy2, height),
            col: axis(cx2, width),
        }
    }

    /// The cell's name: `top left`, `top`, ..., `center`, ..., `bottom right`.
    pub fn name(self) -> String {
        let row = ["top", "", "bottom"][self.row as usize];
        let col = ["left", "", "right"][self.col as usize];
        match (row.is_empty(), col.is_empty()) {
            (true, true) => "center".into(),
            (false, true) => row.into(),
            (true, false) => col.into(),
            (false, false) => format!("{row} {col}"),
        }
    }

    /// The caption's position phrase for this cell: `in the center`, `at the top`,
    /// `on the left`, `in the top left`, ...
    pub fn phrase(self) -> String {
        let preposition = match (self.row == 1, self.col == 1) {
            (false, true) => "at",
            (true, false) => "on",
            _ => "in",
        };
        format!("{preposition} the {}", self.name())
    }

    /// Which axes a position phrase for this cell names: (row, column). `on the left` names
    /// the column only, `at the top` the row only, `in the center` and the corners both.
    pub fn named_axes(self) -> (bool, bool) {
        match (self.row == 1, self.col == 1) {
            (false, true) => (true, false),
            (true, false) => (false, true),
            _ => (true, true),
        }
    }
}

/// How the first named shape of a two-shape caption sits relative to the second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Relation {
    LeftOf,
    Above,
}

impl Relation {
    pub const ALL: [Relation; 2] = [Relation::LeftOf, Relation::Above];

    pub fn phrase(self) -> &'static str {
        match self {
            Relation::LeftOf => "to the left of",
            Relation::Above => "above",
        }
    }
}

/// Color-kind combinations that no training image or caption contains.
pub const HELD_OUT: [(Color, Kind); 4] = [
    (Color::Green, Kind::Triangle),
    (Color::Purple, Kind::Circle),
    (Color::Orange, Kind::Square),
    (Color::White, Kind::Triangle),
];

pub fn is_held_out(color: Color, kind: Kind) -> bool {
    HELD_OUT.contains(&(color, kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cell_phrases() {
        let phrases: Vec<String> = Cell::ALL.iter().map(|c| c.phrase()).collect();
        assert_eq!(
            phrases,
            [
                "in the top left",
                "at the top",
                "in the top right",
                "on the left",
                "in the center",
                "on the right",
                "in the bottom left",
                "at the bottom",
                "in the bottom right"
            ]
        );
    }

    #[test]
    fn cells_of_centres() {
        // Borders at 64/3 and 128/3: centre 21.0 is column 0, 21.5 column 1, 42.5 column 1,
        // 43.0 column 2.
        assert_eq!(Cell::of_centre2(42, 0, 64, 64).col, 0);
        assert_eq!(Cell::of_centre2(43, 0, 64, 64).col, 1);
        assert_eq!(Cell::of_centre2(85, 0, 64, 64).col, 1);
        assert_eq!(Cell::of_centre2(86, 0, 64, 64).col, 2);
        assert_eq!(Cell::of_centre2(128, 128, 64, 64), Cell { row: 2, col: 2 });
    }

    #[test]
    fn nearest_colors() {
        for c in Color::ALL {
            let [r, g, b] = c.rgb();
            assert_eq!(Color::nearest([r.into(), g.into(), b.into()]), c);
        }
    }
}
