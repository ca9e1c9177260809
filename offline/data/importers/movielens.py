"""MovieLens importer: classic 100K (u.data, u.item, u.user) and the ratings.csv/movies.csv family.

MovieLens has no scenarios. One is derived per movie from its genres through an ordered list of genre groups: a
movie belongs to the FIRST group that shares a genre with it (genres are listed alphabetically in the files, so
"first genre" would put most films under Action/Adventure/Animation). Movies matching no group go to "other".
The groups are configurable (`--genre-groups FILE`, a JSON list of {scenario, description, genres}).
Ratings are kept as explicit `rating`; the label is rating > threshold at split time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from offline.data.importers.registry import ImporterSpec
from shared.dataset.folder import SEQ, Dataset, parse_numeric
from shared.errors import DatasetError, UserFacingError


@dataclass(frozen=True)
class GenreGroup:
    scenario: str
    description: str
    genres: tuple[str, ...]


DEFAULT_GENRE_GROUPS: tuple[GenreGroup, ...] = (
    GenreGroup(
        "family",
        "Family and animation: films for children and animated features",
        ("Children", "Children's", "Animation"),
    ),
    GenreGroup(
        "thriller_horror",
        "Thrillers, crime, mystery and horror films",
        ("Horror", "Thriller", "Crime", "Mystery", "Film-Noir"),
    ),
    GenreGroup(
        "action_scifi",
        "Action, adventure, science fiction, fantasy, war and western films",
        ("Action", "Adventure", "Sci-Fi", "Fantasy", "War", "Western", "IMAX"),
    ),
    GenreGroup("comedy", "Comedies", ("Comedy",)),
    GenreGroup(
        "drama_romance",
        "Dramas, romances, musicals and documentaries",
        ("Drama", "Romance", "Musical", "Documentary"),
    ),
)
OTHER = GenreGroup("other", "Films without a listed genre", ())

U_ITEM_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip


def load_genre_groups(path: str | os.PathLike) -> tuple[GenreGroup, ...]:
    try:
        raw = json.loads(Path(path).read_text())
        groups = tuple(GenreGroup(g["scenario"], g["description"], tuple(g["genres"])) for g in raw)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserFacingError(
            f"{path}: expected a JSON list of {{scenario, description, genres}} objects ({exc})"
        ) from None
    if not groups:
        raise UserFacingError(f"{path}: no genre groups")
    return groups


def assign_scenarios(genres: pd.Series, groups: tuple[GenreGroup, ...]) -> pd.Series:
    """genres: '|'-separated genre strings -> scenario name of the first matching group."""
    split = genres.fillna("").str.split("|")
    scenario = pd.Series(OTHER.scenario, index=genres.index, dtype=object)
    unassigned = np.ones(len(genres), dtype=bool)
    for group in groups:
        wanted = set(group.genres)
        hit = split.map(lambda gs, w=wanted: bool(w.intersection(gs))).to_numpy() & unassigned
        scenario[hit] = group.scenario
        unassigned &= ~hit
    return scenario


def _read(path: Path, encoding: str = "utf-8", **kwargs) -> pd.DataFrame:
    try:
        return pd.read_csv(path, encoding=encoding, dtype=str, keep_default_na=False, **kwargs)
    except UnicodeDecodeError as exc:
        raise DatasetError(path.name, f"not valid {encoding}: {exc.reason} at byte {exc.start}") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(path.name, f"cannot parse: {exc}") from None


def _build(
    ratings: pd.DataFrame, movies: pd.DataFrame, groups: tuple[GenreGroup, ...], users: pd.DataFrame | None, name: str
) -> Dataset:
    movies = movies.copy()
    movies["scenario"] = assign_scenarios(movies["genres"], groups)
    known = set(movies["item_id"])
    missing = ~ratings["item_id"].isin(known)
    if missing.any():
        row = int(np.flatnonzero(missing.to_numpy())[0])
        raise DatasetError("ratings", f"movie '{ratings['item_id'].iloc[row]}' not in the movie list", column="item_id")
    item_scenario = movies.set_index("item_id")["scenario"]
    ratings = ratings.copy()
    ratings["scenario"] = item_scenario.loc[ratings["item_id"]].to_numpy()
    used = [g for g in (*groups, OTHER) if g.scenario in set(movies["scenario"])]
    scenarios = pd.DataFrame({"scenario": [g.scenario for g in used], "description": [g.description for g in used]})
    items = pd.DataFrame(
        {
            "item_id": movies["item_id"],
            "title": movies["title"],
            "category": movies["genres"].str.replace("|", ", ", regex=False),
            "scenario": movies["scenario"],
        }
    )
    inter = ratings[["user_id", "item_id", "scenario", "rating", "timestamp"]].reset_index(drop=True)
    inter[SEQ] = np.arange(len(inter), dtype=np.int64)
    return Dataset(scenarios=scenarios, items=items, interactions=inter, users=users, name=name)


def import_movielens(path: str | os.PathLike, groups: tuple[GenreGroup, ...] = DEFAULT_GENRE_GROUPS) -> Dataset:
    """Reads a MovieLens folder: ratings.csv + movies.csv (latest-small, 25M, ...) or u.data + u.item (100K)."""
    root = Path(path)
    if (root / "ratings.csv").exists() and (root / "movies.csv").exists():
        ratings = _read(root / "ratings.csv")
        for col in ("userId", "movieId", "rating", "timestamp"):
            if col not in ratings.columns:
                raise DatasetError("ratings.csv", f"missing column '{col}'", line=1, column=col)
        movies = _read(root / "movies.csv")
        for col in ("movieId", "title", "genres"):
            if col not in movies.columns:
                raise DatasetError("movies.csv", f"missing column '{col}'", line=1, column=col)
        frame = pd.DataFrame(
            {
                "user_id": ratings["userId"].str.strip(),
                "item_id": ratings["movieId"].str.strip(),
                "rating": parse_numeric(ratings, "ratings.csv", "rating", 2).astype("float32"),
                "timestamp": parse_numeric(ratings, "ratings.csv", "timestamp", 2).astype("int64"),
            }
        )
        movie_frame = pd.DataFrame(
            {"item_id": movies["movieId"].str.strip(), "title": movies["title"], "genres": movies["genres"]}
        )
        movie_frame["genres"] = movie_frame["genres"].replace("(no genres listed)", "")
        return _build(frame, movie_frame, groups, None, root.name)
    if (root / "u.data").exists() and (root / "u.item").exists():
        data = _read(root / "u.data", sep="\t", header=None, names=["user", "item", "rating", "ts"])
        frame = pd.DataFrame(
            {
                "user_id": data["user"].str.strip(),
                "item_id": data["item"].str.strip(),
                "rating": parse_numeric(data, "u.data", "rating", 1).astype("float32"),
                "timestamp": parse_numeric(data, "u.data", "ts", 1).astype("int64"),
            }
        )
        item_cols = ["item", "title", "release", "video_release", "url", *U_ITEM_GENRES]
        raw_items = _read(root / "u.item", encoding="latin-1", sep="|", header=None, names=item_cols)
        flags = raw_items[U_ITEM_GENRES[1:]] == "1"
        genres = flags.apply(lambda row: "|".join(g for g, on in row.items() if on), axis=1)
        movie_frame = pd.DataFrame(
            {"item_id": raw_items["item"].str.strip(), "title": raw_items["title"], "genres": genres}
        )
        users = None
        if (root / "u.user").exists():
            u = _read(root / "u.user", sep="|", header=None, names=["user_id", "age", "gender", "occupation", "zip"])
            users = u[["user_id", "age", "gender", "occupation"]].copy()
            users["user_id"] = users["user_id"].str.strip()
        return _build(frame, movie_frame, groups, users, root.name)
    raise UserFacingError(f"{root}: no MovieLens files found (expected ratings.csv + movies.csv, or u.data + u.item)")


@dataclass(frozen=True)
class MovieLensOptions:
    path: str = field(metadata={"positional": True, "help": "folder with the MovieLens files"})
    genre_groups: str | None = field(
        default=None, metadata={"help": "JSON list of {scenario, description, genres}: scenario per first match"}
    )


def load(options: MovieLensOptions) -> Dataset:
    groups = load_genre_groups(options.genre_groups) if options.genre_groups else DEFAULT_GENRE_GROUPS
    return import_movielens(options.path, groups)


IMPORTER = ImporterSpec(
    name="movielens",
    help="MovieLens 100K (u.data/u.item) or ratings.csv/movies.csv (latest-small, 25M)",
    options_class=MovieLensOptions,
    load=load,
)
