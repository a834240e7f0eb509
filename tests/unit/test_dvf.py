"""The DVF file rules and the estimate as pure functions: departments, lots grouped into sales,
the web app's distance, median and rounding."""

from __future__ import annotations

from decimal import Decimal

import pytest

from kontod.demo.dvf_sandbox import Lot, Mutation, csv_file
from kontod.jobs.estimations import Asset, distance_m, estimate
from kontod.providers.dvf import DvfBadAnswer, Sale, department, parse_file, parse_years


@pytest.mark.parametrize(
    ("commune", "dept"),
    [
        ("75056", "75"),
        ("01001", "01"),
        ("2A004", "2A"),
        ("2b033", "2B"),
        ("97105", "971"),
        ("97411", "974"),
        ("97611", "976"),
    ],
)
def test_the_department_of_a_commune(commune: str, dept: str) -> None:
    assert department(commune) == dept


@pytest.mark.parametrize("bad", ["7505", "750561", "ABCDE", "2C004", ""])
def test_text_that_is_no_commune_code_is_refused_by_name(bad: str) -> None:
    with pytest.raises(ValueError, match="not an INSEE commune code"):
        department(bad)


def test_lots_of_one_sale_count_once_and_sales_of_several_dwellings_are_left_out() -> None:
    text = csv_file(
        "69381",
        [
            # A flat with its cellar and parking space: three lines, one sale of 50 m².
            Mutation(
                "2023-1",
                "2023-03-01",
                "261234",
                [Lot("Appartement", "50"), Lot("Dépendance"), Lot("Dépendance")],
                "45.767",
                "4.834",
                street='RUE DU "BAC", BAT B',
            ),
            # Two flats sold together: the price cannot be split.
            Mutation(
                "2023-2",
                "2023-04-01",
                "400000",
                [Lot("Appartement", "30"), Lot("Appartement", "35")],
            ),
            Mutation("2023-3", "2023-05-01", "60000", [Lot("Appartement", "8")]),
            Mutation(
                "2023-4",
                "2023-06-01",
                "270000",
                [Lot("Appartement", "45")],
                nature="Vente en l'état futur d'achèvement",
            ),
            Mutation("2023-5", "2023-07-01", "", [Lot("Maison", "90")]),
            Mutation("2023-6", "2023-08-01", "90000", [Lot(None)]),
        ],
    )
    assert '"RUE DU ""BAC"", BAT B"' in text  # quoted as geo-DVF quotes it
    grouping = parse_file(text.encode(), "test")
    assert grouping.sales == [Sale("Appartement", Decimal("261234"), Decimal("50"), 45.767, 4.834)]
    assert (grouping.several_dwellings, grouping.too_small, grouping.not_a_sale) == (1, 1, 1)
    assert grouping.unreadable == 1


def test_a_file_without_the_columns_says_which_are_missing() -> None:
    with pytest.raises(DvfBadAnswer, match=r"no column .*surface_reelle_bati"):
        parse_file(b"id_mutation,nature_mutation,valeur_fonciere,type_local\n", "the file")


def test_the_listing_gives_its_years_newest_first() -> None:
    html = b'<a href="../">../</a>\n<a href="2021/">2021/</a> <a href="2024/">2024/</a>'
    assert parse_years(html + b'<a href="2023/">2023/</a><a href="latest/">x</a>') == [
        2024,
        2023,
        2021,
    ]


def _sale(kind: str, price: int, surface: int, lat: float | None, lon: float | None) -> Sale:
    return Sale(kind, Decimal(price), Decimal(surface), lat, lon)


def test_the_web_apps_distance() -> None:
    asset = Asset(1, "69381", 45.0, 4.0, Decimal(50), None)
    # 0.01 degree north: 1 110 m; 0.01 degree east at 45°: 1 110 m x cos(45°) = 784.89 m.
    assert distance_m(asset, _sale("Maison", 1, 10, 45.01, 4.0)) == pytest.approx(1110.0)
    assert distance_m(asset, _sale("Maison", 1, 10, 45.0, 4.01)) == pytest.approx(784.889, 1e-5)
    assert distance_m(asset, _sale("Maison", 1, 10, None, None)) == 99_999


def test_the_median_of_the_50_nearest_of_the_same_type_rounded_half_up() -> None:
    # 55 flats on a line going north, 100 m apart; the 50 nearest are 4000 to 4490 a m²,
    # the 5 farthest 100 000 a m² (they would move the median if counted).
    sales = [
        _sale(
            "Appartement", (4000 + 10 * i) * 20 if i < 50 else 2_000_000, 20, 45.0 + i / 1110, 4.0
        )
        for i in range(55)
    ]
    got = estimate(Asset(1, "69381", 45.0, 4.0, Decimal("33.3"), "Appartement"), sales)
    assert got is not None
    # Element 25 of 4000, 4010, ..., 4490 is 4250; 4250 x 33.3 = 141 525.
    assert (got.price_m2, got.value, got.sales_used) == (4250, 141525, 50)
    # Quartiles: elements 12 and 37: 4120 and 4370.
    assert (got.low_m2, got.high_m2, got.same_type, got.nearest) == (4120, 4370, True, True)


def test_half_a_euro_rounds_up_and_fewer_than_five_of_the_type_takes_every_type() -> None:
    sales = [
        _sale("Maison", 10005, 2, 45.0, 4.0),  # 5002.5 a m²
        _sale("Appartement", 9000, 2, 45.0, 4.0),  # 4500
        _sale("Appartement", 11000, 2, 45.0, 4.0),  # 5500
    ]
    got = estimate(Asset(1, "69381", 45.0, 4.0, Decimal(3), "Maison"), sales)
    assert got is not None
    # Sorted 4500, 5002.5, 5500: element 1 is 5002.5, rounded up to 5003; x 3 = 15007.5 -> 15008.
    assert (got.price_m2, got.value, got.same_type) == (5003, 15008, False)


def test_an_asset_without_coordinates_takes_every_comparable_sale() -> None:
    sales = [_sale("Appartement", 5000 + i, 1, 45.0 + i, 4.0) for i in range(60)]
    got = estimate(Asset(1, "69381", None, None, Decimal(1), None), sales)
    assert got is not None
    # All 60 (no nearest-first): element 30 of 5000..5059 is 5030.
    assert (got.sales_used, got.price_m2, got.nearest) == (60, 5030, False)


def test_no_sale_no_estimate() -> None:
    assert estimate(Asset(1, "69381", 45.0, 4.0, Decimal(3), None), []) is None
