"""Telescope profiles: TOML round trip, validation, selection."""

import pytest

from broker.errors import ProfileError
from broker.telescopes import TelescopeProfile, find_profile, load_profile, load_profiles, write_profile


def test_a_profile_round_trips_through_toml(tmp_path):
    profile = TelescopeProfile("seestar-s50", match=("Seestar S50",), gain=0.5, read_noise=1.6, saturation=65000.0,
                               pixel_scale_arcsec=2.39, filters={"IRCUT": "lum", 'LP "dual"': "Ha"},
                               time_reference="mid", zeropoint_1s=20.5, field_grid_deg=1.0)
    path = write_profile(tmp_path, profile)
    assert load_profile(path) == profile
    assert load_profiles(tmp_path) == (profile,)
    with pytest.raises(ProfileError, match="exists"):
        write_profile(tmp_path, profile)


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "bad name/with slash"}, "telescope name"), ({"name": "x", "gain": -1.5}, "gain"),
    ({"name": "x", "gain": float("nan")}, "gain"), ({"name": "x", "time_reference": "end"}, "time_reference"),
    ({"name": "x", "field_grid_deg": 0.0}, "field_grid_deg"), ({"name": "x", "saturation": 1e300}, "saturation"),
])
def test_invalid_profiles_are_refused(kwargs, match):
    with pytest.raises(ProfileError, match=match):
        TelescopeProfile(**kwargs)


@pytest.mark.parametrize("text, match", [("gain = ", "cannot read"), ("name = 'x'\ncolour = 3", "unknown key"),
                                         ("name = 'x'\nfilters = 3", "filters"), ("gain = 1.0", "name"),
                                         ("name = 'x'\nmatch = 'Seestar S50'", "match must be an array"),
                                         ("name = 'x'\n[filters]\nL = 'Lum'", "name no canonical band")])
def test_broken_profile_files_are_named(tmp_path, text, match):
    (tmp_path / "t.toml").write_text(text)
    with pytest.raises(ProfileError, match=match):
        load_profiles(tmp_path)
    with pytest.raises(ProfileError, match="does not exist"):
        load_profiles(tmp_path / "absent")


def test_selection_by_telescop_then_instrume():
    a, b = TelescopeProfile("a", match=("Cecilia",)), TelescopeProfile("b", match=("Seestar S50",))
    assert find_profile((a, b), " cecilia ", "") is a
    assert find_profile((a, b), "S50_1d3fe189", "Seestar S50") is b
    assert find_profile((a, b), "", "") is None
